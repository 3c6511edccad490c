"""The process-local slot through which the composite model hands its guides' scores to the logits
processor of the same engine step.

vLLM's model runner V1 calls `model.compute_logits(hidden_states[logits_indices])` and then, in the
same process and before anything else computes logits for sampling, runs the logits processors on
those rows. The model publishes one [rows, vocab] tensor per guide; the processor takes them and
checks that the row count matches the logits it was given (a mismatch raises rather than mixing the
wrong rows).
"""

from __future__ import annotations

import threading
from typing import Sequence

_lock = threading.Lock()
_slot: dict = {"scores": None, "step": 0}
# Guide names of the composite models built in this process (for request admission).
_known: set[str] = set()


def announce(names: Sequence[str]) -> None:
    _known.update(names)


def known_guides() -> set[str]:
    return set(_known)


def publish(scores: Sequence) -> None:
    with _lock:
        _slot["scores"] = list(scores)
        _slot["step"] += 1


def take(rows: int) -> list:
    """The latest guide scores (one tensor per guide, `rows` rows each); raises if none match."""
    with _lock:
        scores = _slot["scores"]
        _slot["scores"] = None
    if scores is None:
        raise RuntimeError("align-decode: the composite model published no guide scores for this step "
                           "(is the processor running in the model's process, on model runner V1?)")
    if any(s.shape[0] != rows for s in scores):
        raise RuntimeError(f"align-decode: guide scores have {scores[0].shape[0]} rows but the sampler has "
                           f"{rows} (speculative decoding and pipeline parallelism are not supported)")
    return scores


def clear() -> None:
    with _lock:
        _slot["scores"] = None
