"""Which guides a vLLM server has, and which of them a request asks for.

Two pieces of configuration, both plain data (no vLLM, no model loading here):

- Server side, `ALIGN_DECODE_GUIDES`: a JSON object, or the path of a .json / .toml file holding one,
  that maps guide names to where and how to load them. Read from the environment because vLLM checks a
  request's arguments (`validate_params`) in the front-end process, which sees neither the engine's
  processors nor vLLM's `additional_config`; both processes inherit the environment.

- Request side, `SamplingParams.extra_args["align_decode"]`: `{"guides": {name: weight, ...}}`, or the
  same object as a JSON string (the OpenAI-compatible server's `vllm_xargs` only carries flat values).

Everything is validated with messages that say what was expected, so a malformed request is refused
at admission and a malformed server configuration at start-up.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

ENV_VAR = "ALIGN_DECODE_GUIDES"
REQUEST_KEY = "align_decode"
KINDS = ("arm", "qhead")
DTYPES = ("auto", "float32", "float16", "bfloat16")
_SPEC_FIELDS = {"path", "kind", "dtype", "device", "tokenizer", "trust_remote_code"}
_REQUEST_FIELDS = {"guides"}


class GuidanceConfigError(ValueError):
    """The server's guide configuration is malformed."""


@dataclass(frozen=True)
class GuideSpec:
    """How to load one guide.

    Attributes:
        name: the name requests use.
        path: a local model folder (config + weights); never a hub id.
        kind: "arm" (GenARM autoregressive reward model) or "qhead" (controlled-decoding Q-head LM).
            Both are causal LMs over the policy vocabulary whose raw next-token outputs are the guide's
            scores, mixed identically: the weight is 1/beta for an ARM and lambda for a Q-head.
        dtype: "float32" (default: guidance adds scores, so keep them exact), "bfloat16", "float16", or
            "auto" (the checkpoint's own dtype).
        device: torch device for the guide; None = the device vLLM samples on.
        tokenizer: the guide tokenizer's folder (default: path), checked against the policy's.
        trust_remote_code: passed to transformers when loading.
    """

    name: str
    path: str
    kind: str = "arm"
    dtype: str = "float32"
    device: str | None = None
    tokenizer: str | None = None
    trust_remote_code: bool = False

    @classmethod
    def parse(cls, name: Any, raw: Any, where: str) -> "GuideSpec":
        if not isinstance(name, str) or not name.strip():
            raise GuidanceConfigError(f"{where}: guide names must be non-empty strings, got {name!r}")
        if isinstance(raw, str):
            raw = {"path": raw}  # shorthand: "name": "/folder"
        if not isinstance(raw, Mapping):
            raise GuidanceConfigError(
                f"{where}: guide {name!r} must be an object like "
                '{"path": "/models/arm", "kind": "arm"}, got ' + type(raw).__name__
            )
        unknown = set(raw) - _SPEC_FIELDS
        if unknown:
            raise GuidanceConfigError(
                f"{where}: guide {name!r} has unknown field(s) {sorted(unknown)}; allowed: {sorted(_SPEC_FIELDS)}"
            )
        path = raw.get("path")
        if not isinstance(path, str) or not path:
            raise GuidanceConfigError(f"{where}: guide {name!r} needs a 'path' (a local model folder)")
        kind = raw.get("kind", "arm")
        if kind not in KINDS:
            raise GuidanceConfigError(f"{where}: guide {name!r} kind must be one of {KINDS}, got {kind!r}")
        dtype = raw.get("dtype", "float32")
        if dtype not in DTYPES:
            raise GuidanceConfigError(f"{where}: guide {name!r} dtype must be one of {DTYPES}, got {dtype!r}")
        device = raw.get("device")
        if device is not None and not isinstance(device, str):
            raise GuidanceConfigError(f"{where}: guide {name!r} device must be a string like 'cpu' or 'cuda:0'")
        tokenizer = raw.get("tokenizer")
        if tokenizer is not None and not isinstance(tokenizer, str):
            raise GuidanceConfigError(f"{where}: guide {name!r} tokenizer must be a folder path")
        trust = raw.get("trust_remote_code", False)
        if not isinstance(trust, bool):
            raise GuidanceConfigError(f"{where}: guide {name!r} trust_remote_code must be true or false")
        return cls(name, path, kind, dtype, device, tokenizer, trust)


@dataclass(frozen=True)
class GuideConfig:
    """The guides a server offers, by name (empty when nothing is configured)."""

    guides: dict[str, GuideSpec] = field(default_factory=dict)
    source: str = ENV_VAR

    def __bool__(self) -> bool:
        return bool(self.guides)

    def names(self) -> list[str]:
        return sorted(self.guides)

    @classmethod
    def from_mapping(cls, raw: Any, source: str) -> "GuideConfig":
        if not isinstance(raw, Mapping):
            raise GuidanceConfigError(
                f"{source}: expected an object mapping guide names to "
                '{"path": ..., "kind": "arm"|"qhead"}, got ' + type(raw).__name__
            )
        return cls({name: GuideSpec.parse(name, spec, source) for name, spec in raw.items()}, source)

    @classmethod
    def from_value(cls, value: str | None) -> "GuideConfig":
        """Parse the environment variable's value: inline JSON, or a .json / .toml file path."""
        if value is None or not value.strip():
            return cls()
        text = value.strip()
        if text.startswith("{"):
            try:
                raw = json.loads(text)
            except json.JSONDecodeError as e:
                raise GuidanceConfigError(f"{ENV_VAR} is not valid JSON: {e}") from None
            return cls.from_mapping(raw, ENV_VAR)
        path = Path(text).expanduser()
        if not path.is_file():
            raise GuidanceConfigError(
                f"{ENV_VAR}={text!r} is neither a JSON object nor the path of an existing .json/.toml file"
            )
        where = f"{ENV_VAR} file {path}"
        if path.suffix == ".toml":
            import tomllib

            try:
                raw = tomllib.loads(path.read_text())
            except tomllib.TOMLDecodeError as e:
                raise GuidanceConfigError(f"{where} is not valid TOML: {e}") from None
            # A TOML file may nest the table as [guides.NAME] to read naturally.
            if set(raw) == {"guides"} and isinstance(raw["guides"], Mapping):
                raw = raw["guides"]
        else:
            try:
                raw = json.loads(path.read_text())
            except json.JSONDecodeError as e:
                raise GuidanceConfigError(f"{where} is not valid JSON: {e}") from None
        return cls.from_mapping(raw, where)


_CACHE: dict[str | None, GuideConfig | GuidanceConfigError] = {}


def guide_config(value: str | None = None, *, from_env: bool = True) -> GuideConfig:
    """The server's guide configuration (from $ALIGN_DECODE_GUIDES unless a value is given), parsed once
    per distinct value: validate_params runs for every request."""
    if value is None and from_env:
        value = os.environ.get(ENV_VAR)
    hit = _CACHE.get(value)
    if hit is None:
        try:
            hit = GuideConfig.from_value(value)
        except GuidanceConfigError as e:
            hit = e
        _CACHE[value] = hit
    if isinstance(hit, GuidanceConfigError):
        raise hit
    return hit


@dataclass(frozen=True)
class RequestGuidance:
    """What one request asked for: a weight per guide name (zero weights are dropped: a guide with
    weight 0 changes nothing, so it is not run for the request)."""

    weights: tuple[tuple[str, float], ...]

    def __bool__(self) -> bool:
        return bool(self.weights)


def _weight(name: str, value: Any) -> float:
    # bool is an int in Python; "true" as a weight is almost certainly a mistake.
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"align_decode guide {name!r}: the weight must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"align_decode guide {name!r}: the weight must be finite, got {value}")
    return value


def parse_request(extra_args: Mapping[str, Any] | None, config: GuideConfig) -> RequestGuidance | None:
    """The guidance a request asks for, or None when it does not opt in.

    Raises ValueError with a message meant for the client when the request is malformed or names a
    guide this server does not have.
    """
    if not extra_args or REQUEST_KEY not in extra_args:
        return None
    raw = extra_args[REQUEST_KEY]
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as e:
            raise ValueError(f"extra_args['{REQUEST_KEY}'] is a string but not valid JSON: {e}") from None
    example = '{"guides": {"<name>": <weight>, ...}}'
    if not isinstance(raw, Mapping):
        raise ValueError(f"extra_args['{REQUEST_KEY}'] must be an object like {example}, got {type(raw).__name__}")
    unknown = set(raw) - _REQUEST_FIELDS
    if unknown:
        raise ValueError(
            f"extra_args['{REQUEST_KEY}'] has unknown key(s) {sorted(unknown)}; expected {example}"
        )
    guides = raw.get("guides", {})
    if not isinstance(guides, Mapping):
        raise ValueError(
            f"extra_args['{REQUEST_KEY}']['guides'] must map guide names to weights, got {type(guides).__name__}"
        )
    weights = []
    for name, value in guides.items():
        if not isinstance(name, str):
            raise ValueError(f"align_decode guide names must be strings, got {name!r}")
        w = _weight(name, value)
        if name not in config.guides:
            offered = ", ".join(config.names()) if config else f"none (the server sets no {ENV_VAR})"
            raise ValueError(f"align_decode: this server has no guide named {name!r}; configured guides: {offered}")
        if w != 0.0:
            weights.append((name, w))
    return RequestGuidance(tuple(weights))
