"""Running one method over a prompt file: batching, seeding, scoring, writing, and the run's summary.

Every prompt gets its own seed, derived from the run's --seed and the prompt's id. The decoding loop
draws each row from its prompt's seed alone, so a prompt's output does not depend on which batch,
shard or resumed run it falls in. With --backend vllm the engine seeds each request from the prompt's
seed the same way (vLLM's sampler draws other tokens than ours for one seed, from the same law).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import resource
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from .console import Console
from .prompts_file import FORMATS, PromptFileError, PromptRecord, parse_shard, read_prompts, shard_records
from .results_file import ResultsFile, encode_line
from .methods import BACKENDS, DEFAULT_METHOD, BuildContext, check_applicable, check_backend, get_method
from ..rewards.registry import RewardContext, build_rewards, check_specs

DTYPES = ("auto", "float32", "bfloat16", "float16")
# RunConfig fields that become vllm.LLM keyword arguments (under the same names) with --backend vllm.
ENGINE_OPTIONS = ("tensor_parallel_size", "pipeline_parallel_size", "gpu_memory_utilization", "max_model_len",
                  "enforce_eager")


class RunFailure(RuntimeError):
    """Generation failed part-way; what finished is saved. The command exits with status 1."""


class Terminated(BaseException):
    """SIGTERM, turned into an exception so the run can say what it saved (like KeyboardInterrupt)."""


@dataclass
class RunConfig:
    prompts: str
    out: str
    method: str = DEFAULT_METHOD
    model: str | None = None
    method_options: dict = field(default_factory=dict)
    rewards: tuple[str, ...] = ()
    seed: int = 0
    temperature: float = 0.7
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    max_new_tokens: int = 48
    n: int = 1
    batch_size: int = 8
    device: str = "auto"
    dtype: str = "auto"
    chat_template: bool = True
    prompt_format: str = "auto"
    resume: bool = False
    skip_bad_lines: bool = False
    shard: str | None = None
    given: dict = field(default_factory=dict)  # {option: where it was set}, for the method check
    backend: str = "hf"
    tensor_parallel_size: int | None = None
    pipeline_parallel_size: int | None = None
    gpu_memory_utilization: float | None = None
    max_model_len: int | None = None
    enforce_eager: bool = False

    def __post_init__(self) -> None:
        if not self.prompts:
            raise ValueError("no prompt file: give --prompts FILE (or `prompts` in the config)")
        if not self.out:
            raise ValueError("no output file: give --out FILE (or `out` in the config)")
        if not 0 <= self.seed < 2**63:
            raise ValueError(f"--seed must be in [0, 2^63), got {self.seed}")
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise ValueError(f"--temperature must be a finite number >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"--top-p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"--top-k must be >= 0 (0 = off), got {self.top_k}")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"--min-p must be in [0, 1], got {self.min_p}")
        for name in ("max_new_tokens", "n", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.dtype not in DTYPES:
            raise ValueError(f"--dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.prompt_format not in FORMATS:
            raise ValueError(f"--prompt-format must be one of {FORMATS}, got {self.prompt_format!r}")
        parse_shard(self.shard)  # validates the format
        if self.backend not in BACKENDS:
            raise ValueError(f"--backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        for name, value in self.engine_options().items():
            flag = "--" + name.replace("_", "-")
            if self.backend != "vllm":
                raise ValueError(f"{flag} is an option of the vLLM engine: it needs --backend vllm")
            if isinstance(value, bool):
                continue
            if name == "gpu_memory_utilization":
                if not 0 < value <= 1:
                    raise ValueError(f"{flag} must be in (0, 1], got {value}")
            elif value < 1:
                raise ValueError(f"{flag} must be >= 1, got {value}")

    def engine_options(self) -> dict:
        """The vLLM engine options that were set, as `vllm.LLM` keyword arguments."""
        values = {name: getattr(self, name) for name in ENGINE_OPTIONS}
        return {name: v for name, v in values.items() if v is not None and v is not False}  # 0 is a value

    @property
    def do_sample(self) -> bool:
        return self.temperature > 0

    def generation(self) -> dict:
        """The sampling settings as recorded on every output line."""
        return {
            "max_new_tokens": self.max_new_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "min_p": self.min_p,
            "n": self.n,
            "do_sample": self.do_sample,
            "chat_template": self.chat_template,
        }


@dataclass
class Summary:
    out: str
    method: str
    shard: str
    shard_prompts: int  # prompts of this shard in the file
    already_done: int  # of those, found in the output (--resume) and skipped
    prompts: int = 0  # written by this run
    generated_tokens: int = 0  # every candidate's tokens
    seconds: float = 0.0  # generation and scoring; loading excluded
    load_seconds: float = 0.0
    mean_reward: dict = field(default_factory=dict)  # over this run's completions
    peak_memory_mb: float = 0.0  # the process's peak resident memory
    peak_gpu_memory_mb: float | None = None

    @property
    def tokens_per_second(self) -> float:
        return self.generated_tokens / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), "tokens_per_second": round(self.tokens_per_second, 3)}

    def text(self) -> str:
        lines = [
            f"{self.prompts} prompt(s) written to {self.out}"
            + (f" ({self.already_done} already there)" if self.already_done else "")
            + (f", shard {self.shard}" if self.shard != "0/1" else ""),
            f"{self.generated_tokens} tokens in {self.seconds:.1f} s ({self.tokens_per_second:.1f} tokens/s); "
            f"loading took {self.load_seconds:.1f} s",
        ]
        if self.mean_reward:
            lines.append("mean reward: " + ", ".join(f"{k} {v:.4f}" for k, v in self.mean_reward.items()))
        memory = f"peak memory {self.peak_memory_mb:.0f} MiB"
        if self.peak_gpu_memory_mb is not None:
            memory += f", GPU {self.peak_gpu_memory_mb:.0f} MiB"
        lines.append(memory)
        return "\n".join("  " + ln if i else ln for i, ln in enumerate(lines))


def prompt_seed(run_seed: int, key: str) -> int:
    """A prompt's seed: a pure function of the run's seed and the prompt's id."""
    from ..kernels import derive_seeds

    digest = hashlib.sha256(key.encode("utf-8")).digest()
    index = int.from_bytes(digest[:8], "little") >> 1  # keep it a non-negative int64
    return int(derive_seeds(run_seed, index))


def encode_prompt(record: PromptRecord, tokenizer, use_template: bool, source) -> list[int]:
    """The prompt's token ids: through the chat template when the model has one (and it is wanted)."""
    if use_template and getattr(tokenizer, "chat_template", None):
        messages = record.messages or [{"role": "user", "content": record.prompt}]
        try:
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as e:  # templates raise their own errors (e.g. an unsupported role)
            raise PromptFileError(source, record.line, f"the chat template refused these messages: {e}") from None
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    elif record.messages is not None:
        has_one = getattr(tokenizer, "chat_template", None)
        why = "--no-chat-template is set" if has_one else "the model has no chat template"
        raise PromptFileError(source, record.line, f"chat messages need a chat template, but {why}; give a prompt")
    else:
        ids = tokenizer(record.prompt)["input_ids"]
    if not ids:
        raise PromptFileError(source, record.line, "the prompt has no tokens")
    return list(ids)


def _peak_memory_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def _resolve_device(device: str, dtype: str) -> tuple[str, str]:
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: no CUDA device is available here; use --device cpu")
    if dtype == "auto":
        dtype = "bfloat16" if device.startswith("cuda") else "float32"
    return device, dtype


@contextlib.contextmanager
def _sigterm_raises():
    """SIGTERM raises Terminated in the main thread, so the run can report what it saved."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _differences(old: dict, new: dict) -> list[str]:
    # Compare as written (lists, not tuples) so only real changes show.
    old_plain, new_plain = json.loads(encode_line(old)), json.loads(encode_line(new))
    return [k for k in new_plain if k in old_plain and old_plain[k] != new_plain[k]]


class _StepCounter:
    """A streamer (put/end, as the decoding loop feeds one) that only moves the progress bar."""

    def __init__(self, console: Console, steps: int):
        self.console, self.steps, self.seen = console, steps, 0

    def put(self, tokens) -> None:
        self.seen += 1
        self.console.step(self.seen, self.steps)

    def end(self) -> None:
        pass


class Run:
    """One run of the command. __init__ checks the options and reads the prompt file, so those errors come
    before any model loads; generate() loads, decodes and writes."""

    def __init__(self, config: RunConfig, console: Console | None = None):
        self.config = config
        self.console = console or Console()
        self.method = get_method(config.method)
        check_applicable(self.method, config.given)
        check_backend(self.method, config.backend)
        if config.backend == "vllm":
            import importlib.util

            from ..serving.engines.vllm_engine import INSTALL_HINT

            if importlib.util.find_spec("vllm") is None:  # found without importing it
                raise ValueError(f"--backend vllm needs vLLM, which is not installed: {INSTALL_HINT}")
        shard_i, shard_n = parse_shard(config.shard)
        self.shard = f"{shard_i}/{shard_n}"
        if Path(config.out).resolve() == Path(config.prompts).resolve():
            raise ValueError("--out is the prompt file; choose another output file")
        check_specs(config.rewards)
        records = read_prompts(config.prompts, config.prompt_format, config.skip_bad_lines, warn=self.console.warn)
        self.records = shard_records(records, shard_i, shard_n)
        self.out = ResultsFile(config.out, resume=config.resume, warn=self.console.warn)

    def close(self) -> None:
        """Stop the engines the run started (--backend vllm), if any."""
        context = getattr(self, "context", None)
        if context is not None:
            context.close_engines()

    def generate(self) -> Summary:
        config, console = self.config, self.console
        with self.out.open(), _sigterm_raises():
            previous = self.out.first
            if previous is not None and previous.get("method") != config.method:
                raise ValueError(
                    f"{config.out} holds results of method {previous.get('method')!r}, not {config.method!r}; "
                    "use another --out"
                )
            pending = [r for r in self.records if r.key not in self.out.done]
            summary = Summary(
                out=str(config.out), method=config.method, shard=self.shard,
                shard_prompts=len(self.records), already_done=len(self.records) - len(pending),
            )
            if not pending:
                console.note(f"nothing to do: all {len(self.records)} prompt(s) are already in {config.out}")
                summary.peak_memory_mb = _peak_memory_mb()
                return summary
            started = time.perf_counter()
            self._load(pending)
            summary.load_seconds = time.perf_counter() - started
            if previous is not None:
                changed = _differences(previous, self.fixed_fields)
                if changed:
                    console.warn(f"{config.out} was started with other settings ({', '.join(changed)}); "
                                 "the new lines will differ in those")
            self._write_all(pending, summary)
        return summary

    # ------------------------------------------------------------------------------------ loading
    def _load(self, pending: list[PromptRecord]) -> None:
        from ..decoding import GenerationSettings, Policy
        from ..models import list_local_models, load_model, resolve_model_path

        config, console = self.config, self.console
        device, dtype = _resolve_device(config.device, config.dtype)
        if config.model is None and list_local_models()[0]["status"] == "convertible":
            console.note("converting the bundled default model once (about half a minute)")
        path = resolve_model_path(config.model)
        if config.backend != "hf" and self.method.engine_only:
            from ..serving.engines import EnginePolicy

            # Every policy forward pass runs in the engine: only the tokenizer and configs load here.
            console.note(f"starting {config.backend} on {path} ({dtype})")
            self.policy = EnginePolicy.from_folder(path)
            model, tokenizer = self.policy.model, self.policy.tokenizer
        else:
            console.note(f"loading {path} ({device}, {dtype})")
            model, tokenizer = load_model(path, device=device, dtype=dtype)
            self.policy = Policy(model, tokenizer)
        self.device = device
        reward_context = RewardContext(device, dtype, tokenizer, pending)
        self.rewards = build_rewards(config.rewards, reward_context, note=console.note)
        if self.method.needs_reward and not self.rewards:
            raise ValueError(f"method {self.method.name!r} needs a reward: pass --reward NAME")
        options = {name: config.method_options.get(name) for name in self.method.options}
        self.context = context = BuildContext(
            self.policy, path, device, dtype, self.rewards, n=config.n,
            backend=config.backend, engine_options={"dtype": dtype, **config.engine_options()},
        )
        self.strategy = self.method.build(options, context)
        hyper = {k: v for k, v in options.items() if v not in (None, ())}
        hyper.update(self.strategy.hyperparameters())
        # Greedy ignores temperature; keep it 1 so strategies that rescale by it see a neutral value.
        self.settings = GenerationSettings.resolve(
            model, tokenizer, None, 0,
            max_new_tokens=config.max_new_tokens,
            do_sample=config.do_sample,
            temperature=config.temperature if config.do_sample else 1.0,
            top_k=config.top_k,
            top_p=config.top_p,
            min_p=config.min_p,
            num_return_sequences=1 if self.method.n_is_candidates else config.n,
        )
        # The fields every line of this run shares.
        self.fixed_fields = {
            "method": config.method,
            "hyperparameters": hyper,
            "generation": {**config.generation(), "stop_ids": list(self.settings.stop_ids)},
            "model": str(path),
            "dtype": dtype,
            "run_seed": config.seed,
            "reward_specs": list(self.rewards),
        }

    # ------------------------------------------------------------------------------------ writing
    def _write_all(self, pending: list[PromptRecord], summary: Summary) -> None:
        config, console = self.config, self.console
        tokenizer = self.policy.tokenizer
        encoded = [encode_prompt(r, tokenizer, config.chat_template, config.prompts) for r in pending]
        totals = {name: 0.0 for name in self.rewards}
        console.start_clock()
        console.progress(0, len(pending), 0)
        started = time.perf_counter()
        try:
            for start in range(0, len(pending), config.batch_size):
                records = pending[start : start + config.batch_size]
                try:
                    lines = self._run_batch(records, encoded[start : start + config.batch_size])
                except Exception as e:
                    ids = ", ".join(json.dumps(r.id) for r in records)
                    raise RunFailure(
                        f"prompt(s) {ids} failed: {type(e).__name__}: {e} "
                        f"({summary.prompts} finished prompt(s) are saved; rerun with --resume)"
                    ) from e
                for line in lines:
                    self.out.append(line)
                    summary.prompts += 1
                    summary.generated_tokens += line["tokens"]["generated"]
                    for name, value in line.get("rewards", {}).items():
                        totals[name] += value
                console.progress(summary.prompts, len(pending), summary.generated_tokens)
        except (KeyboardInterrupt, Terminated):
            console.warn(
                f"stopped after {self.out.written} of {len(pending)} prompt(s); they are saved in {config.out}, "
                "rerun with --resume to continue"
            )
            raise
        finally:
            console.clear_bar()
            summary.seconds = time.perf_counter() - started
            if summary.prompts:
                summary.mean_reward = {k: v / summary.prompts for k, v in totals.items()}
            summary.peak_memory_mb = _peak_memory_mb()
            if self.device.startswith("cuda"):
                import torch

                summary.peak_gpu_memory_mb = torch.cuda.max_memory_allocated() / 2**20

    def _run_batch(self, records: list[PromptRecord], encoded: list[list[int]]) -> list[dict]:
        import torch

        from ..decoding import PromptBatch, left_pad

        seeds = [prompt_seed(self.config.seed, r.key) for r in records]
        ids, mask = left_pad(encoded, self.settings.pad_id, device=self.policy.device)
        batch = PromptBatch(ids, mask, [r.text for r in records])
        settings = replace(self.settings, seeds=torch.tensor(seeds, dtype=torch.long))
        if self.console.bar and self.strategy.streams:
            settings.streamer = _StepCounter(self.console, settings.max_new_tokens)
        tick = time.perf_counter()
        decoded = self.strategy.run(self.policy, batch, settings)
        generate_seconds = time.perf_counter() - tick
        outputs = self.method.layout(decoded, len(records))

        # Every candidate of the batch in one list, so each reward scores the batch in one call.
        flat = [(b, ids) for b, out in enumerate(outputs) for ids in out.candidates]
        texts = self.policy.tokenizer.batch_decode([ids for _, ids in flat], skip_special_tokens=True)
        tick = time.perf_counter()
        prompts = [records[b].text for b, _ in flat]
        scores = {name: reward.score(prompts, texts).tolist() for name, reward in self.rewards.items()}
        reward_seconds = time.perf_counter() - tick
        stops = set(self.settings.stop_ids)

        def candidate(i: int) -> dict:
            tokens = flat[i][1]
            return {
                "text": texts[i],
                "tokens": len(tokens),
                "finish_reason": "stop" if tokens and tokens[-1] in stops else "length",
                **({"rewards": {name: s[i] for name, s in scores.items()}} if scores else {}),
            }

        lines, first = [], 0
        for record, seed, prompt_ids, out in zip(records, seeds, encoded, outputs):
            candidates = [candidate(first + c) for c in range(len(out.candidates))]
            first += len(out.candidates)
            chosen = candidates[out.chosen]
            line = {"id": record.id, "prompt": record.text}
            if record.messages is not None:
                line["messages"] = record.messages
            line["completion"] = chosen["text"]
            line["finish_reason"] = chosen["finish_reason"]
            if "rewards" in chosen:
                line["rewards"] = chosen["rewards"]
            if len(candidates) > 1:
                line["candidates"] = candidates
                line["chosen"] = out.chosen
            if out.extras:
                line["extras"] = out.extras
            line.update(self.fixed_fields)
            line["seed"] = seed
            line["tokens"] = {
                "prompt": len(prompt_ids),
                "completion": chosen["tokens"],
                "generated": sum(c["tokens"] for c in candidates),
            }
            line["timing"] = {
                "batch_seconds": round(generate_seconds, 4),
                "batch_prompts": len(records),
                "reward_seconds": round(reward_seconds, 4),
            }
            if record.meta:
                line["meta"] = record.meta
            lines.append(line)
        return lines


def run(config: RunConfig, console: Console | None = None) -> Summary:
    """Check everything, then run the method over the prompts, appending one line per prompt."""
    job = Run(config, console)
    try:
        return job.generate()
    finally:
        job.close()
