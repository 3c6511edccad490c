"""The process-local slot through which the composite model hands its guides' scores to the logits
processor of the same engine step.

vLLM's model runner V1 calls `model.compute_logits(hidden_states[logits_indices])` and then, in the
same process and before anything else computes logits for sampling, runs the logits processors on
those rows. The model publishes one [rows, vocab] tensor per guide; the processor takes them and
checks that the row count matches the logits it was given (a mismatch raises rather than mixing the
wrong rows).

The same module carries the other way the processor's state reaches the model: the per-step switch
that skips the guides when no row opts in, and the admission stamp that makes skipping safe under
prefix caching (package docstring, "Idle steps").
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
    if scores is SKIPPED:
        raise RuntimeError("align-decode: the composite model skipped its guides in a step with a guided "
                           "row (the processor's per-step switch and its batch disagree)")
    if any(s.shape[0] != rows for s in scores):
        raise RuntimeError(f"align-decode: guide scores have {scores[0].shape[0]} rows but the sampler has "
                           f"{rows} (speculative decoding and pipeline parallelism are not supported)")
    return scores


def clear() -> None:
    with _lock:
        _slot["scores"] = None


# ------------------------------------------------------------------------ idle steps (no guided row)
# Whether this step's forward must run the guides. The logits processor decides it in `update_state`,
# which vLLM's model runner V1 calls before the forward of the same step; the model reads it. It starts
# (and is reset by each new model) at True: profiling and warm-up forwards run the guides.
_step: dict = {"guides": True}
SKIPPED = object()  # published instead of scores when the guides did not run


def set_guides_needed(flag: bool) -> None:
    _step["guides"] = bool(flag)


def guides_needed() -> bool:
    return _step["guides"]


def publish_skipped() -> None:
    with _lock:
        _slot["scores"] = SKIPPED
        _slot["step"] += 1


# ------------------------------------------------------------------------ admission: which requests opt in
# A request whose guides are skipped in a step leaves that step's guide KV unwritten. Under prefix
# caching another request could later read those blocks, so guided requests are given their own cache
# salt. The engine core's admission hook (package `register`) applies the processor's rule
# (`guidance.OptInRule`) and stamps its answer, with the rule's fingerprint, into the request's
# extra_args, so the processor can check that every request it sees was salted by its own rule.
MARK = "align_decode_kv"
SALT = "\x00align-decode:guided"
