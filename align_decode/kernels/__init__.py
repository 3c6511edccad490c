"""Per-step kernels: mixing policy and guide scores with sampling, behind one dispatch function."""

from .dispatch import sample_next
from .reference import SampleOutput, mix_scores
from .rows import SamplingRows, derive_seeds, row_uniform

__all__ = [
    "SampleOutput",
    "SamplingRows",
    "derive_seeds",
    "mix_scores",
    "row_uniform",
    "sample_next",
]
