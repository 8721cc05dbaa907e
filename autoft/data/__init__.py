"""Data layer: loading labelled data, splitting it, encoding it for a backbone, streaming it."""
from autoft.data.datasets import (LabelledData, load_csv, load_digits_data, load_image_folder, load_image_table,
                                  load_npz)
from autoft.data.encode import encode
from autoft.data.splits import Splits, stratified_split

__all__ = ["LabelledData", "Splits", "encode", "load_csv", "load_digits_data", "load_image_folder",
           "load_image_table", "load_npz", "stratified_split"]
