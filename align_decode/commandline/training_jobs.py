"""What `align-decode make-preferences`, `train-arm` and `train-value` do, apart from parsing options.

Each job checks everything that needs no model first (settings, files, the output path), so a bad
input fails in a second with one message; then it loads the policy, runs, saves and returns a summary.

    make-preferences: prompts + policy + reward  -> JSONL of (prompt, chosen, rejected)
    train-arm:        that JSONL + policy         -> an ARM folder (`run --method genarm --arm DIR`)
    train-value:      prompts + policy + reward   -> a CD-FUDGE value model folder
                                                     (`run --method cd_tokenwise --value-model DIR`)
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from .prompts_file import FORMATS, read_prompts
from .results_file import ResultsFile
from ..training.preferences import PreferenceSettings, sample_preferences
from ..training.arm import ARMTrainingConfig
from ..validation import AT_LEAST_ONE, POSITIVE, Bounds, check_choice

Note = Callable[[str], None]

_LAYERS = Bounds(ge=1, integer=True, allow_none=True)  # None: every layer of the policy
_SEED = Bounds(ge=0, lt=2**63, integer=True)


def _quiet(message: str) -> None:
    pass


def set_threads(threads: int | None) -> None:
    """Pin torch's intra-op threads (None leaves torch's default). On a shared machine, more threads
    than free cores makes every forward pass spin and wait."""
    import torch

    if threads is None:
        return
    AT_LEAST_ONE.check(threads, "--threads")
    torch.set_num_threads(threads)


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: no CUDA device is available here; use --device cpu")
    return device


def check_new_folder(out, what: str) -> Path:
    """The output folder must not hold anything yet: saving over another model mixes their files."""
    path = Path(out)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise ValueError(f"--out {path} already exists and is not an empty folder; choose a new folder for the {what}")
    return path


def _one_reward(spec: str | None, tokenizer, records, device: str):
    from ..rewards.registry import NONE, RewardContext, build_reward, check_spec

    if not spec or spec == NONE:
        raise ValueError("--reward is required: the reward to prefer high-scoring responses by (see `align-decode rewards`)")
    check_spec(spec)
    if tokenizer is None:
        return None
    return build_reward(spec, RewardContext(device, "float32", tokenizer, records))


def _encode_all(records, tokenizer, chat_template: bool, source) -> list[list[int]]:
    from .run import encode_prompt

    return [encode_prompt(r, tokenizer, chat_template, source) for r in records]


# ------------------------------------------------------------------------------------ make-preferences
@dataclass
class PreferenceJob:
    prompts: str
    out: str
    reward: str
    model: str | None = None
    settings: PreferenceSettings = field(default_factory=PreferenceSettings)
    chat_template: bool = True
    prompt_format: str = "auto"
    resume: bool = False
    device: str = "auto"

    def __post_init__(self):
        check_choice(self.prompt_format, "--prompt-format", FORMATS)
        if Path(self.out).resolve() == Path(self.prompts).resolve():
            raise ValueError("--out is the prompt file; choose another output file")


def make_preferences(job: PreferenceJob, note: Note = _quiet, progress=None) -> dict:
    """Run make-preferences; returns the summary (prompts, pairs, skipped, rewards, seconds)."""
    import torch

    from ..decoding import Policy
    from ..models import load_model, resolve_model_path
    from .run import prompt_seed

    records = read_prompts(job.prompts, job.prompt_format)
    _one_reward(job.reward, None, records, "cpu")  # the spec's syntax, before anything loads
    results = ResultsFile(job.out, resume=job.resume, warn=note)
    summary = {"out": str(job.out), "prompts": len(records), "pairs": 0, "skipped": 0, "already_done": 0,
               "settings": asdict(job.settings), "reward": job.reward}
    with results.open():
        pending = [r for r in records if r.key not in results.done]
        summary["already_done"] = len(records) - len(pending)
        if not pending:
            note(f"nothing to do: every prompt already has a pair in {job.out}")
            return summary
        device = resolve_device(job.device)
        path = resolve_model_path(job.model)
        note(f"loading {path} ({device})")
        started = time.perf_counter()
        model, tokenizer = load_model(path, device=device)
        reward = _one_reward(job.reward, tokenizer, pending, device)
        encoded = _encode_all(pending, tokenizer, job.chat_template, job.prompts)
        seeds = [prompt_seed(job.settings.seed, r.key) for r in pending]
        margins, means = [], []
        with torch.no_grad():
            for sampled in sample_preferences(Policy(model, tokenizer), encoded, [r.text for r in pending], seeds,
                                              reward, job.settings, progress):
                record = pending[sampled.index]
                means.append(sum(sampled.rewards) / len(sampled.rewards))
                line = sampled.line(record.id, record.messages if record.messages is not None else record.prompt)
                if line is None:
                    summary["skipped"] += 1
                    continue
                if record.meta:
                    line["meta"] = record.meta
                results.append(line)
                summary["pairs"] += 1
                margins.append(line["chosen_reward"] - line["rejected_reward"])
        summary["seconds"] = round(time.perf_counter() - started, 2)
        summary["mean_reward"] = sum(means) / len(means)
        summary["mean_margin"] = sum(margins) / len(margins) if margins else None
        summary["model"] = str(path)
    return summary


# ------------------------------------------------------------------------------------------ train-arm
@dataclass
class ARMJob:
    preferences: str
    out: str
    model: str | None = None
    layers: int | None = None  # keep the policy's first `layers` blocks: a small, fast ARM
    config: ARMTrainingConfig = field(default_factory=ARMTrainingConfig)
    device: str = "auto"

    def __post_init__(self):
        _LAYERS.check(self.layers, "--layers", mention_none=False)


def train_arm_job(job: ARMJob, note: Note = _quiet) -> dict:
    """Run train-arm: load the pairs and the policy, train, save the ARM folder; returns the metrics."""
    from ..models import load_model, resolve_model_path
    from ..training.arm import load_preferences, save_arm, train_arm, truncate_layers

    records = load_preferences(job.preferences)
    out = check_new_folder(job.out, "ARM")
    device = resolve_device(job.device)
    path = resolve_model_path(job.model)
    note(f"loading {path} ({device}); {len(records)} preference pair(s)")
    # Training runs in float32 whatever the policy decodes in: bfloat16 gradients on LoRA are too coarse.
    model, tokenizer = load_model(path, device=device, dtype="float32")
    if job.layers is not None:
        truncate_layers(model, job.layers)
    started = time.perf_counter()
    metrics = train_arm(model, tokenizer, records, job.config, log=note)
    metrics.update(seconds=round(time.perf_counter() - started, 2), policy=str(path), preferences=str(job.preferences),
                   layers=model.config.num_hidden_layers)
    save_arm(model, tokenizer, out, metrics)
    metrics["out"] = str(out)
    return metrics


def arm_summary(metrics: dict) -> str:
    """Two lines for the terminal: what was trained and what it learned on held-out pairs."""
    cfg = metrics["config"]
    lines = [f"ARM saved to {metrics['out']} ({metrics['layers']} layers, "
             f"{'LoRA r=' + str(cfg['lora_r']) if cfg['lora_r'] else 'full fine-tuning'}, "
             f"{metrics['train_pairs']} pairs, {metrics['optimizer_steps']} steps, {metrics['seconds']:.0f} s)",
             f"training loss {metrics['train_loss_first']:.4f} -> {metrics['train_loss_last']:.4f}"]
    before, after = metrics.get("eval_before"), metrics.get("eval_after")
    if before and after:
        lines.append(f"held-out ({after['pairs']} pairs): accuracy {before['accuracy']:.3f} -> {after['accuracy']:.3f}, "
                     f"margin {before['margin']:.3f} -> {after['margin']:.3f}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------- train-value
@dataclass(frozen=True)
class ValueSettings:
    """CD-FUDGE settings of train-value; every field is validated before anything loads."""

    kind: str = "q"
    layers: int | None = None
    samples: int = 8  # rollouts per prompt
    max_new_tokens: int = 32
    temperature: float = 1.0
    steps: int = 200
    batch_size: int = 32
    lr: float = 1e-3
    max_rows: int = 64
    seed: int = 0

    def __post_init__(self):
        from ..training.value import KINDS

        check_choice(self.kind, "--kind", KINDS)
        for name in ("samples", "max_new_tokens", "steps", "batch_size", "max_rows"):
            AT_LEAST_ONE.check(getattr(self, name), f"--{name.replace('_', '-')}")
        _LAYERS.check(self.layers, "--layers", mention_none=False)
        POSITIVE.check(self.temperature, "--temperature")  # rollouts are sampled: no greedy 0
        POSITIVE.check(self.lr, "--lr")
        _SEED.check(self.seed, "--seed")


@dataclass
class ValueJob:
    prompts: str
    out: str
    reward: str
    model: str | None = None
    settings: ValueSettings = field(default_factory=ValueSettings)
    chat_template: bool = True
    prompt_format: str = "auto"
    device: str = "auto"

    def __post_init__(self):
        check_choice(self.prompt_format, "--prompt-format", FORMATS)


def train_value_job(job: ValueJob, note: Note = _quiet) -> dict:
    """Run train-value (CD-FUDGE): sample and score rollouts, regress a value model on them, save it."""
    import torch

    from ..models import load_model, resolve_model_path
    from ..training.arm import truncate_layers
    from ..training.value import new_value_model, sample_rollouts, save_value_model, train_value_model

    s = job.settings
    records = read_prompts(job.prompts, job.prompt_format)
    _one_reward(job.reward, None, records, "cpu")
    out = check_new_folder(job.out, "value model")
    device = resolve_device(job.device)
    path = resolve_model_path(job.model)
    note(f"loading {path} ({device})")
    policy, tokenizer = load_model(path, device=device, dtype="float32")
    reward = _one_reward(job.reward, tokenizer, records, device)
    encoded = _encode_all(records, tokenizer, job.chat_template, job.prompts)
    started = time.perf_counter()
    note(f"sampling {s.samples} rollout(s) for each of {len(records)} prompt(s)")
    rollouts = sample_rollouts(policy, tokenizer, encoded, reward, samples_per_prompt=s.samples,
                               max_new_tokens=s.max_new_tokens, temperature=s.temperature, seed=s.seed,
                               max_rows=s.max_rows, prompt_texts=[r.text for r in records])
    sampled = time.perf_counter()
    value = new_value_model(policy, s.kind)
    if s.layers is not None:
        truncate_layers(value, s.layers)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    note(f"training a {s.kind} value model ({value.config.num_hidden_layers} layers) for {s.steps} step(s)")
    losses = train_value_model(value, rollouts, s.kind, steps=s.steps, batch_size=s.batch_size, lr=s.lr, seed=s.seed,
                               pad_id=pad)
    rewards = rollouts.rewards.double()
    tail = losses[-min(10, len(losses)):]
    info = {
        "method": "cd-fudge", "reward": job.reward, "policy": str(path), "layers": value.config.num_hidden_layers,
        "prompts": len(records), **asdict(s), "rollouts": len(rollouts),
        "mean_reward": float(rewards.mean()),
        # The loss of always predicting the mean reward: a trained model must do better than this.
        "constant_loss": float(0.5 * rewards.var(unbiased=False)),
        "first_loss": losses[0], "final_loss": sum(tail) / len(tail),
        "sampling_seconds": round(sampled - started, 2),
        "training_seconds": round(time.perf_counter() - sampled, 2),
    }
    with torch.no_grad():
        save_value_model(value, out, s.kind, tokenizer, info)
    info["out"] = str(out)
    return info


def value_summary(info: dict) -> str:
    return (f"value model ({info['kind']}, {info['layers']} layers) saved to {info['out']}: {info['rollouts']} rollouts, "
            f"mean reward {info['mean_reward']:.4f}; loss {info['first_loss']:.4f} -> {info['final_loss']:.4f} "
            f"(predicting the mean: {info['constant_loss']:.4f}); "
            f"{info['sampling_seconds']:.0f} s sampling, {info['training_seconds']:.0f} s training")
