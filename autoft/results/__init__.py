"""Results a person can read and a program can use: tables, best configuration, plots."""
from autoft.results.report import write_report

__all__ = ["write_report"]
