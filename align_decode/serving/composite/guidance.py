"""The logits processor's side of the composite path (model runner V1): which rows are guided, with
which weights, and the mixing of the scores the composite model handed over this step.

No guide runs here and no token is read: the guides ran inside vLLM's forward. A request's state is
its weights (c * w_i per packed guide, c = temperature or 1 for greedy), kept at its batch index
through vLLM's `BatchUpdate`s (removed, added, moved: in that order).

It also sets the per-step switch that lets the model skip its guides when no row of the step opts in
(package docstring, "Idle steps"); `idle_skip` says whether an engine allows that at all.
"""

from __future__ import annotations

import logging
import os
from typing import Callable

import torch

from ..vllm_plugin.batch import apply_moves
from ..vllm_plugin.config import GuideConfig, GuideSpec, RequestGuidance, parse_request
from . import handoff
from .spec import CompositeSpec

logger = logging.getLogger(__name__)

IDLE_SKIP_ENV = "ALIGN_DECODE_COMPOSITE_IDLE_SKIP"


def with_packed(config: GuideConfig, names) -> GuideConfig:
    """The server's configuration plus the guides packed in a composite model (served in-engine)."""
    names = [n for n in names if n not in config.guides]
    if not names:
        return config
    packed = {n: GuideSpec(n, "<composite model>") for n in names}
    return GuideConfig({**config.guides, **packed}, config.source)


def only(guidance: RequestGuidance | None, names) -> RequestGuidance | None:
    """The part of a request's guidance that names guides in `names` (None if nothing is left)."""
    if not guidance:
        return None
    kept = tuple((n, w) for n, w in guidance.weights if n in names)
    return RequestGuidance(kept) if kept else None


class OptInRule:
    """Which packed guides a request asks for: one pure function of its extra_args, the packed names
    and the processor-path configuration, computed alike by the logits processor (in the worker) and by
    the engine core's admission hook (which may be another process). `fingerprint` names the inputs, so
    the processor can tell that a stamp was made by the same rule.
    """

    def __init__(self, packed, config: GuideConfig, on_error: Callable | None = None):
        import hashlib
        import json

        self.packed = tuple(packed)
        self.config = with_packed(config, self.packed)
        self.on_error = on_error
        key = json.dumps([sorted(self.packed), sorted(config.guides)])
        self.fingerprint = hashlib.sha1(key.encode()).hexdigest()[:16]

    def guidance(self, params) -> RequestGuidance | None:
        try:
            return only(parse_request(getattr(params, "extra_args", None), self.config), self.packed)
        except ValueError as e:
            if self.on_error is not None:
                self.on_error(e)
            return None

    def stamp(self, params, guided: bool | None = None) -> str:
        if guided is None:
            guided = bool(self.guidance(params))
        return f"{self.fingerprint}:{int(guided)}"

    @classmethod
    def for_engine(cls, vllm_config) -> "OptInRule | None":
        """The rule of an engine serving a composite model (None for any other model)."""
        from ..vllm_plugin.config import guide_config

        spec = CompositeSpec.from_hf_config(getattr(getattr(vllm_config, "model_config", None), "hf_config", None))
        if spec is None:
            return None
        return cls(spec.names(), guide_config())


def stamp_request(rule: OptInRule, request) -> None:
    """Admission (engine core, before the request's prefix-cache block hashes exist): stamp the rule's
    answer into the request's extra_args and give a guided request its own cache salt."""
    params = getattr(request, "sampling_params", None)
    if params is None:
        return
    guided = bool(rule.guidance(params))
    params.extra_args = {**(params.extra_args or {}), handoff.MARK: rule.stamp(params, guided)}
    if guided:
        request.cache_salt = (request.cache_salt or "") + handoff.SALT


def idle_skip(vllm_config) -> tuple[bool, bool, str]:
    """(allowed, needs_stamps, why): whether this engine may skip the guides in steps where no request
    opts in, and whether that relies on guided requests being salted at admission (prefix caching on).

    Refused where a skipped step could be replayed or read by another path: full CUDA graphs (captured
    with the guides; a replay cannot skip them, and a graph captured without them could not run them),
    KV-transfer connectors (cached KV written elsewhere), or when $ALIGN_DECODE_COMPOSITE_IDLE_SKIP=0.
    """
    if os.environ.get(IDLE_SKIP_ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        return False, False, f"{IDLE_SKIP_ENV} is off"
    mode = getattr(getattr(vllm_config, "compilation_config", None), "cudagraph_mode", None)
    if mode is not None and getattr(mode, "has_full_cudagraphs", lambda: False)():
        return False, False, "full CUDA graphs are captured with the guides"
    if getattr(vllm_config, "kv_transfer_config", None) is not None:
        return False, False, "a KV-transfer connector may supply KV the guides did not write"
    caching = bool(getattr(getattr(vllm_config, "cache_config", None), "enable_prefix_caching", False))
    return True, caching, ("guided requests get their own prefix-cache salt" if caching else "prefix caching is off")


class CompositeV1Guidance:
    """Args:
        spec: the composite model's guides (their order is the order of the scores handed over).
        parse: SamplingParams -> RequestGuidance | None, restricted to the packed guides.
        scale: SamplingParams -> c.
        skip: (allowed, needs_stamps) from `idle_skip`; default: never skip the guides.
    """

    def __init__(self, spec: CompositeSpec, parse: Callable, scale: Callable, skip: tuple[bool, bool] = (False, False),
                 fingerprint: str | None = None):
        self.spec = spec
        self.index = {g.name: i for i, g in enumerate(spec.guides)}
        self.widths = [g.width for g in spec.guides]
        self.parse = parse
        self.scale = scale
        self.by_index: dict[int, list[float]] = {}
        self._cache: tuple | None = None  # (rows, weights [G, n]) rebuilt when the batch changes
        # Under prefix caching, skipping relies on the admission stamps of `parse`'s rule.
        self.fingerprint = fingerprint
        self.skip = bool(skip[0]) and (not skip[1] or fingerprint is not None)
        self.needs_stamps = bool(skip[1])
        self.skipped_once = False
        handoff.set_guides_needed(True)

    def _check_stamp(self, params, guided: bool) -> None:
        """Skipping stays safe only while every request was salted by this processor's own rule."""
        stamp = (getattr(params, "extra_args", None) or {}).get(handoff.MARK)
        if stamp != f"{self.fingerprint}:{int(guided)}":
            self.skip = False
            logger.warning("align-decode composite: a request was not stamped at admission by this engine's "
                           "rule (stamp %r, expected %s:%d), so it may share prefix-cache blocks with requests "
                           "of the other kind; the guides now run in every step", stamp, self.fingerprint, guided)

    def update_state(self, batch_update) -> None:
        if batch_update is not None:
            self._update(batch_update)
        # The model reads this in the forward of the step whose batch this is.
        needed = bool(self.by_index) or not self.skip
        handoff.set_guides_needed(needed)
        if not needed and not self.skipped_once:
            self.skipped_once = True
            logger.info("align-decode composite: a step without guided requests: guide forwards skipped")

    def _update(self, batch_update) -> None:
        changed = False
        for index in batch_update.removed:
            changed |= self.by_index.pop(index, None) is not None
        for index, params, _prompt, _output in batch_update.added:
            changed |= self.by_index.pop(index, None) is not None
            guidance = self.parse(params)
            if self.skip and self.needs_stamps:
                self._check_stamp(params, bool(guidance))
            if not guidance:
                continue
            c = self.scale(params)
            w = [0.0] * len(self.index)
            for name, weight in guidance.weights:
                w[self.index[name]] += c * weight
            self.by_index[index] = w
            changed = True
        if batch_update.moved:
            apply_moves(self.by_index, batch_update.moved, lambda row: self.by_index.pop(row, None))
            changed = True
        if changed:
            self._cache = None

    def _rows(self, device: torch.device):
        if self._cache is None or self._cache[0].device != device:
            rows = sorted(self.by_index)
            weights = torch.tensor([self.by_index[r] for r in rows], dtype=torch.float32).T.contiguous()
            self._cache = (torch.tensor(rows, dtype=torch.long).to(device), weights.to(device),
                           [bool(weights[g].any()) for g in range(weights.shape[0])], max(rows) if rows else -1)
        return self._cache

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.by_index:
            return logits  # nothing guided this step: the published scores are simply not read
        scores = handoff.take(logits.shape[0])
        rows, weights, used, top = self._rows(logits.device)
        if top >= logits.shape[0]:
            raise RuntimeError(f"align-decode: guided row {top} is outside the {logits.shape[0]}-row batch")
        width = logits.shape[1]
        add = None
        narrow = width
        for g, s in enumerate(scores):
            if not used[g]:
                continue
            w = min(width, s.shape[1], self.widths[g] or width)
            narrow = min(narrow, w)
            part = s.index_select(0, rows)[:, :w].to(torch.float32) * weights[g].unsqueeze(-1)
            if add is None:
                add = torch.zeros(rows.shape[0], width, dtype=torch.float32, device=logits.device)
            add[:, :w] += part
        if add is None:
            return logits
        logits.index_put_((rows,), add.to(logits.dtype), accumulate=True)
        if narrow < width:
            # Tokens a guide cannot score (padding rows of the policy head) are out of the law.
            logits[:, narrow:].index_put_((rows,), torch.tensor(float("-inf"), device=logits.device))
        return logits
