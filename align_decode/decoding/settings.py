"""Generation settings: resolved from `model.generate()`-style arguments the way transformers does.

Precedence, lowest first: transformers' global defaults, the model's generation_config, a
generation_config passed to the call, then keyword arguments. An argument that align-decode cannot
honour is an error when the caller set it, and a warning when only the model's saved config set it
(so checkpoints whose configs carry e.g. a repetition penalty still load, loudly).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, replace
from typing import Any, Callable, Sequence

import torch

from ..errors import AlignDecodeWarning
from ..kernels import SamplingRows, derive_seeds

# Settings the engine honours.
SUPPORTED = {
    "max_length",
    "max_new_tokens",
    "do_sample",
    "temperature",
    "top_k",
    "top_p",
    "min_p",
    "num_return_sequences",
    "eos_token_id",
    "pad_token_id",
    "bos_token_id",
    "output_scores",
    "return_dict_in_generate",
    "use_cache",
}
# Bookkeeping fields of GenerationConfig that say nothing about decoding.
_IGNORED = {
    "transformers_version",
    "_from_model_config",
    "decoder_start_token_id",
    "is_assistant",
    "compile_config",
    "disable_compile",
    "cache_implementation",
    "cache_config",
    "max_cache_len",
    "low_memory",
    "continuous_batching_config",
    "prefill_chunk_size",
    "use_mtp",
}
_DEFAULTS = {
    "max_length": 20,
    "do_sample": False,
    "temperature": 1.0,
    "top_k": 50,
    "top_p": 1.0,
    "min_p": None,
    "num_return_sequences": 1,
    "output_scores": False,
    "return_dict_in_generate": False,
}
# Values of unsupported fields that mean "off" (anything else would change the output).
_NEUTRAL = {
    "num_beams": 1,
    "num_beam_groups": 1,
    "repetition_penalty": 1.0,
    "encoder_repetition_penalty": 1.0,
    "length_penalty": 1.0,
    "no_repeat_ngram_size": 0,
    "encoder_no_repeat_ngram_size": 0,
    "typical_p": 1.0,
    "epsilon_cutoff": 0.0,
    "eta_cutoff": 0.0,
    "diversity_penalty": 0.0,
    "min_length": 0,
    "min_new_tokens": 0,
    "early_stopping": False,
    "renormalize_logits": False,
    "remove_invalid_values": False,
    "output_attentions": False,
    "output_hidden_states": False,
    "output_logits": False,
    "num_assistant_tokens": 20,
    "num_assistant_tokens_schedule": "constant",
    "assistant_confidence_threshold": 0.4,
    "assistant_lookbehind": 10,
    "target_lookbehind": 10,
    "token_healing": False,
}


def _config_fields(config) -> dict[str, Any]:
    if config is None:
        return {}
    raw = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return {k: v for k, v in raw.items() if v is not None and k not in _IGNORED}


def _is_neutral(name: str, value: Any) -> bool:
    return name in _NEUTRAL and value == _NEUTRAL[name]


def _as_id_tuple(value) -> tuple[int, ...]:
    if value is None:
        return ()
    if torch.is_tensor(value):
        value = value.flatten().tolist()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


@dataclass
class GenerationSettings:
    max_new_tokens: int
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    num_return_sequences: int = 1
    stop_ids: tuple[int, ...] = ()
    pad_id: int = 0
    output_scores: bool = False
    return_dict_in_generate: bool = False
    streamer: Any = None
    seeds: torch.Tensor | None = None  # [prompts] base seed per prompt
    row_offset: int = 0  # index of the first row per prompt (a chunk of a larger sample)
    # progress(what, done, total): where a long call is ("step", "candidates", "chain step"), for a
    # progress display; the loop reports its steps, sequence methods their own units.
    progress: Callable[[str, int, int], None] | None = None

    def report(self, what: str, done: int, total: int) -> None:
        if self.progress is not None:
            self.progress(what, done, total)

    def __post_init__(self) -> None:
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an integer >= 0, got {self.max_new_tokens!r}")
        if self.num_return_sequences < 1:
            raise ValueError(f"num_return_sequences must be >= 1, got {self.num_return_sequences}")
        if self.do_sample:
            if not (self.temperature > 0) or self.temperature == float("inf"):
                raise ValueError(
                    f"temperature must be a finite number > 0 when sampling, got {self.temperature} "
                    "(use do_sample=False for greedy decoding)"
                )
            if self.top_k < 0:
                raise ValueError(f"top_k must be >= 0 (0 turns it off), got {self.top_k}")
            if not 0 < self.top_p <= 1:
                raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
            if not 0 <= self.min_p <= 1:
                raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")

    def row_seeds(self, prompts: int, n: int, device=None) -> torch.Tensor:
        """One seed per output row (prompt-major, n per prompt): a pure function of the prompt's seed
        and the row's index among that prompt's n rows, so batch composition never matters."""
        base = self.seeds
        if base is None:
            # Like model.generate(), follow torch's global RNG when no seed is given. Callers that draw
            # several times for one request (chunks) fix the seeds first with `with_fixed_seeds`.
            base = torch.randint(0, 2**62, (prompts,), dtype=torch.long)
        base = torch.as_tensor(base, dtype=torch.long)
        if base.ndim == 0:
            base = base.expand(prompts)
        if base.shape != (prompts,):
            raise ValueError(f"seed must be one int or one per prompt ({prompts}), got shape {tuple(base.shape)}")
        index = torch.arange(self.row_offset, self.row_offset + n).repeat(prompts)
        return derive_seeds(base.repeat_interleave(n), index).to(device)

    def sampling_rows(self, seeds: torch.Tensor, temperature: float | torch.Tensor | None = None) -> SamplingRows:
        """Per-row sampling settings for rows with these seeds."""
        t = self.temperature if temperature is None else temperature
        return SamplingRows.build(
            seeds.shape[0],
            temperature=t,
            top_k=self.top_k if self.do_sample else 0,
            top_p=self.top_p if self.do_sample else 1.0,
            min_p=self.min_p if self.do_sample else 0.0,
            greedy=not self.do_sample,
            seed=seeds,
            device=seeds.device,
        )

    def with_fixed_seeds(self, prompts: int) -> "GenerationSettings":
        """These settings with one explicit seed per prompt (drawn from torch's RNG if none was given)."""
        if self.seeds is not None:
            seeds = torch.as_tensor(self.seeds, dtype=torch.long)
            seeds = seeds.expand(prompts) if seeds.ndim == 0 else seeds
        else:
            seeds = torch.randint(0, 2**62, (prompts,), dtype=torch.long)
        return replace(self, seeds=seeds)

    @classmethod
    def resolve(
        cls,
        model=None,
        tokenizer=None,
        generation_config=None,
        input_length: int = 0,
        streamer=None,
        seed=None,
        **kwargs,
    ) -> "GenerationSettings":
        """Merge defaults, the model's generation_config, a passed config and keyword arguments."""
        from_model = _config_fields(getattr(model, "generation_config", None))
        from_user = {**_config_fields(generation_config), **{k: v for k, v in kwargs.items() if v is not None}}
        for name, value in from_user.items():
            if name not in SUPPORTED and not _is_neutral(name, value):
                raise ValueError(
                    f"generate() argument {name}={value!r} is not supported by align-decode; supported: "
                    f"{', '.join(sorted(SUPPORTED))}, plus seed and streamer"
                )
        for name, value in from_model.items():
            if name not in SUPPORTED and name not in from_user and not _is_neutral(name, value):
                warnings.warn(
                    f"the model's generation_config sets {name}={value!r}, which align-decode does not apply",
                    AlignDecodeWarning,
                    stacklevel=3,
                )
        merged = {**_DEFAULTS, **{k: v for k, v in from_model.items() if k in SUPPORTED}, **from_user}

        if "max_new_tokens" in merged:
            max_new = merged["max_new_tokens"]
        else:
            max_new = merged["max_length"] - input_length
            if max_new < 0:
                raise ValueError(
                    f"max_length={merged['max_length']} is shorter than the prompt ({input_length} tokens); "
                    "set max_new_tokens instead"
                )
        stop = _as_id_tuple(merged.get("eos_token_id"))
        if not stop and tokenizer is not None and tokenizer.eos_token_id is not None:
            stop = (tokenizer.eos_token_id,)
        pad = merged.get("pad_token_id")
        if pad is None and tokenizer is not None:
            pad = tokenizer.pad_token_id
        if pad is None:
            pad = stop[0] if stop else 0
        seeds = None if seed is None else torch.as_tensor(seed, dtype=torch.long)
        return cls(
            max_new_tokens=int(max_new),
            do_sample=bool(merged["do_sample"]),
            temperature=float(merged["temperature"]),
            top_k=int(merged["top_k"] or 0),
            top_p=float(merged["top_p"]),
            min_p=float(merged["min_p"] or 0.0),
            num_return_sequences=int(merged["num_return_sequences"]),
            stop_ids=stop,
            pad_id=int(pad),
            output_scores=bool(merged["output_scores"]),
            return_dict_in_generate=bool(merged["return_dict_in_generate"]),
            streamer=streamer,
            seeds=seeds,
        )


def validate_ids(ids: Sequence[int], vocab: int, what: str) -> None:
    bad = [i for i in ids if not 0 <= i < vocab]
    if bad:
        raise ValueError(f"{what} {bad} outside the vocabulary [0, {vocab})")
