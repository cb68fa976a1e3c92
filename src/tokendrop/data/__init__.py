"""VQA data: the dataset-folder format (``load_dataset``) and the synthetic high-resolution generator."""

from tokendrop.data.dataset import Sample, load_dataset
from tokendrop.data.synth import QUESTION_TYPES, generate_dataset, make_sample

__all__ = ["Sample", "load_dataset", "generate_dataset", "make_sample", "QUESTION_TYPES"]
