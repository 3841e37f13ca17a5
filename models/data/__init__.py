"""Data: the synthetic B-mode phantom and the data sets the networks train on."""
from speckle_models.data.datasets import DeviceBatches, UltrasoundData, load_dataset
from speckle_models.data.phantom import generate_phantom

__all__ = ["DeviceBatches", "UltrasoundData", "load_dataset", "generate_phantom"]
