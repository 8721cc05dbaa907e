"""Production artifacts: export a trial as a self-contained folder, and serve predictions from it.

* :func:`export_trial` (in :mod:`autoft.export.export`) refits a trial of a study with its exact
  configuration and seed and writes ``config.yaml``, ``classes.json``, ``preprocessing.json``
  (+ ``tokenizer/`` for text), ``metrics.json``, ``model.pt2`` (a ``torch.export`` program, the primary
  PyTorch format), ``model.onnx`` (dynamo-based exporter; the legacy one only as a stated fallback),
  ``model.ts`` (TorchScript, legacy: one more release), ``model.pt`` (state_dict), ``model.json``, a model
  card ``README.md`` and ``manifest.json`` (sha256 of every file).  An existing ``out`` folder is
  replaced only when it is exactly a previous export (its manifest lists every file it holds), and only
  the files that export listed are deleted.
* :func:`load_exported` (in :mod:`autoft.export.runtime`) loads such a folder with torch /
  onnxruntime only — it never imports autoft's training code — and predicts; backend ``"auto"`` takes
  ``model.pt2``, else ``model.onnx``, else ``model.ts``.  It first checks that every file the export needs
  is listed in ``manifest.json``, matches its sha256 and lies inside the folder, and loads ``model.pt2``
  only when it cannot run code (:func:`autoft.export.runtime.load_pt2`); image files over
  ``max_image_pixels`` are refused before decoding.

Both are imported lazily so that ``import autoft.export`` stays light.
"""
from __future__ import annotations

__all__ = ["ExportResult", "ExportedModel", "Predictions", "export_trial", "load_exported"]


def __getattr__(name: str):
    if name in ("export_trial", "ExportResult"):
        from autoft.export import export

        return getattr(export, name)
    if name in ("load_exported", "ExportedModel", "Predictions"):
        from autoft.export import runtime

        return getattr(runtime, name)
    raise AttributeError(f"module 'autoft.export' has no attribute {name!r}")
