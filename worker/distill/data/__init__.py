"""Datasets: safe unpacking of untrusted uploads, decoding into uint8 tensors, splits and batch transforms."""

from .archive import safe_extract
from .dataset import DatasetInfo, DatasetSplits, ImageSet, inspect_dataset, load_dataset
from .transforms import augment_batch, to_model_input

__all__ = [
    "DatasetInfo",
    "DatasetSplits",
    "ImageSet",
    "augment_batch",
    "inspect_dataset",
    "load_dataset",
    "safe_extract",
    "to_model_input",
]
