"""Training a value model for controlled decoding with CD-FUDGE (Mudgal et al., 2024).

On-policy Monte-Carlo regression:
  1. sample responses y ~ p(. | x) from the policy;
  2. score each with the sequence reward r(x, y);
  3. regress the value of every prefix of y onto its own response's reward:

         L(theta) = 1/2 * mean over (response i, position t) of (V_theta(x_i, y_i,<=t) - r(x_i, y_i))^2.

For a model free at every prefix, the minimiser is the mean reward of the sampled responses through
that prefix: a Monte-Carlo estimate of V*(x, y_<=t) = E_{z ~ p}[r(x, y_<=t, z)], the policy's value
(r itself once the prefix ends in EOS). So CD-FUDGE's fixed point is V*, with an unbiased gradient.

Two shapes of value model:
- kind="q": a Q-head causal LM; the value of y_<=t is Q(x, y_<t, y_t), its output at position t-1 for
  the token actually taken. Loads back as a `QValueModel` (all next tokens per forward).
- kind="scalar": a sequence-classification model read at every position; the value of y_<=t is the
  head on y_t's hidden state. Loads back as a `ScalarValueModel` (top-k candidates per step).

`train_cd_fudge` does the three steps and saves the model with `save_pretrained`, plus a
`value_model.json` that `load_value_model` reads to rebuild the right decoder-side object.
"""

from __future__ import annotations

import copy
import json
from collections import defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

import torch

from ..decoding.candidates import completion_ids, sample_candidates, score_completions
from ..decoding.prompts import PromptBatch, left_pad
from ..decoding.settings import GenerationSettings
from ..decoding.strategy import Policy, Sample
from ..kernels import derive_seeds
from ..decoding.guides.value import QValueModel, ScalarValueModel, _PerPositionValues
from ..validation import AT_LEAST_ONE, POSITIVE, check_choice

KINDS = ("q", "scalar")
VALUE_CONFIG = "value_model.json"


# -------------------------------------------------------------------------------------- rollouts
@dataclass
class Rollouts:
    """EngineOutput responses and their rewards: the CD-FUDGE training set."""

    prompt_ids: list[list[int]]  # [N] prompt tokens of each response
    responses: list[list[int]]  # [N] response tokens (the stop token included when it ended on one)
    rewards: torch.Tensor  # [N] r(x, y)

    def __len__(self) -> int:
        return len(self.responses)

    def select(self, index: Sequence[int]) -> "Rollouts":
        index = list(index)
        return Rollouts([self.prompt_ids[i] for i in index], [self.responses[i] for i in index], self.rewards[index])


def sample_rollouts(
    policy,
    tokenizer,
    prompts: Sequence[Sequence[int]] | Sequence[str],
    reward,
    *,
    samples_per_prompt: int = 8,
    max_new_tokens: int = 32,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    max_rows: int = 64,
    prompt_texts: Sequence[str] | None = None,
    eos_token_id=None,
    pad_token_id: int | None = None,
) -> Rollouts:
    """Draw samples_per_prompt responses per prompt from the policy (the engine's sampler, fixed seeds)
    and score them with the reward (token ids if it has `score_ids`, else text).

    prompts: token id lists, or strings (encoded with the tokenizer, no special tokens added)."""
    AT_LEAST_ONE.check(samples_per_prompt, "samples_per_prompt")
    if not prompts:
        raise ValueError("sample_rollouts needs at least one prompt")
    if isinstance(prompts[0], str):
        if tokenizer is None:
            raise ValueError("text prompts need the policy's tokenizer")
        prompt_texts = list(prompts) if prompt_texts is None else prompt_texts
        prompts = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    prompts = [list(p) for p in prompts]
    settings = GenerationSettings.resolve(
        policy, tokenizer, None, 0, max_new_tokens=max_new_tokens, do_sample=True, temperature=temperature,
        top_k=top_k, top_p=top_p, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
    )
    # One seed per prompt, so different prompts do not share random streams.
    settings = replace(settings, seeds=derive_seeds(seed, torch.arange(len(prompts))))
    device = next(policy.parameters()).device
    batch = PromptBatch(*left_pad(prompts, settings.pad_id, device), list(prompt_texts) if prompt_texts else None)
    drawn = sample_candidates(Sample(), Policy(policy, tokenizer), batch, settings, samples_per_prompt, max_rows)
    responses = completion_ids(drawn)
    prompt_ids = [p for p in prompts for _ in range(samples_per_prompt)]
    texts = None
    if not callable(getattr(reward, "score_ids", None)):
        texts = [t for t in batch.prompt_texts(tokenizer) for _ in range(samples_per_prompt)]
    rewards = score_completions(reward, tokenizer, texts, responses, prompt_ids)
    if not bool(torch.isfinite(rewards).all()):
        raise ValueError("the reward returned non-finite values: they cannot be regression targets")
    return Rollouts(prompt_ids, responses, rewards)


# -------------------------------------------------------------------------- the regression target
def fudge_loss(values: torch.Tensor, rewards: torch.Tensor, mask: torch.Tensor,
               weights: torch.Tensor | None = None) -> torch.Tensor:
    """1/2 * mean over valid (i, t) of (values[i, t] - rewards[i])^2: every prefix of response i
    regresses onto response i's reward. values, mask: [N, T]; rewards: [N]; weights: [N] counts of
    identical responses (a response drawn n times weighs n), None for 1 each."""
    mask = mask.bool()
    if not bool(mask.any()):
        raise ValueError("fudge_loss needs at least one valid prefix")
    w = mask.to(values.dtype)
    if weights is not None:
        w = w * weights.to(values.dtype).unsqueeze(-1)
    err = values - rewards.to(values.dtype).unsqueeze(-1)
    return 0.5 * (w * err.masked_fill(~mask, 0).pow(2)).sum() / w.sum()


def group_rollouts(rollouts: Rollouts) -> tuple[Rollouts, torch.Tensor]:
    """Identical (prompt, response) pairs merged: (unique pairs with their mean reward, their counts).

    Sum_i (V - r_i)^2 over n copies of one response = n * (V - mean r)^2 + a constant, so fudge_loss
    with these weights has the gradient of fudge_loss over the raw rollouts: the same training, with
    one forward per distinct response (most of them on small vocabularies, none on long responses)."""
    sums: dict = defaultdict(float)
    counts: dict = defaultdict(int)
    for prompt, response, r in zip(rollouts.prompt_ids, rollouts.responses, rollouts.rewards.tolist()):
        key = (tuple(prompt), tuple(response))
        sums[key] += r
        counts[key] += 1
    keys = list(sums)
    grouped = Rollouts([list(k[0]) for k in keys], [list(k[1]) for k in keys],
                       torch.tensor([sums[k] / counts[k] for k in keys], dtype=torch.float64))
    return grouped, torch.tensor([counts[k] for k in keys], dtype=torch.float64)


def monte_carlo_values(rollouts: Rollouts) -> dict[tuple[tuple[int, ...], tuple[int, ...]], tuple[float, int]]:
    """{(prompt, response prefix): (mean reward of the rollouts through it, their count)}: the minimiser
    of fudge_loss over a model free at every prefix (set d/dV of sum (V - r)^2 to zero)."""
    sums: dict = defaultdict(float)
    counts: dict = defaultdict(int)
    for prompt, response, r in zip(rollouts.prompt_ids, rollouts.responses, rollouts.rewards.tolist()):
        for t in range(1, len(response) + 1):
            key = (tuple(prompt), tuple(response[:t]))
            sums[key] += r
            counts[key] += 1
    return {key: (sums[key] / counts[key], counts[key]) for key in sums}


def prefix_values(model, kind: str, prompt_ids: Sequence[Sequence[int]], responses: Sequence[Sequence[int]],
                  pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's V(x, y_<=t) for every response prefix: ([N, T] values, [N, T] mask), with gradients.

    Sequences are right padded (a causal model's earlier positions never see the padding) and the
    default positions 0..L-1 are then each token's true position."""
    check_choice(kind, "kind", KINDS)
    device = next(model.parameters()).device
    seqs = [list(p) + list(r) for p, r in zip(prompt_ids, responses)]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        attn[i, : len(s)] = 1
    ids, attn = ids.to(device), attn.to(device)
    steps = max(len(r) for r in responses)
    start = torch.tensor([len(p) for p in prompt_ids], device=device)
    t = torch.arange(steps, device=device)
    mask = t < torch.tensor([len(r) for r in responses], device=device).unsqueeze(-1)
    token_pos = (start.unsqueeze(-1) + t).clamp(max=width - 1)  # where y_t sits
    if kind == "q":
        # Q(x, y_<t, y_t): the output at the position before y_t, read at y_t's id.
        logits = model(input_ids=ids, attention_mask=attn).logits
        rows = logits.gather(1, (token_pos - 1).unsqueeze(-1).expand(-1, -1, logits.shape[-1]))
        values = rows.gather(-1, ids.gather(1, token_pos).unsqueeze(-1)).squeeze(-1)
    else:
        per_position = _PerPositionValues(model, 0)(input_ids=ids, attention_mask=attn, use_cache=False).logits
        values = per_position.squeeze(-1).gather(1, token_pos)
    return values.float(), mask


# ---------------------------------------------------------------------------------- the models
def _zero_output_head(model) -> None:
    """Untie the output head from the input embeddings and zero it: every Q(., z) starts at 0, so a
    token never sampled in training keeps a neutral value instead of the policy's logit."""
    head = model.get_output_embeddings()
    if head is None:
        raise TypeError(f"{type(model).__name__} has no output head to zero")
    head.weight = torch.nn.Parameter(torch.zeros_like(head.weight))
    if getattr(head, "bias", None) is not None:
        head.bias = torch.nn.Parameter(torch.zeros_like(head.bias))
    model.config.tie_word_embeddings = False
    text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else None
    if text is not None and text is not model.config:
        text.tie_word_embeddings = False


def new_value_model(policy=None, kind: str = "q", config=None, zero_head: bool = True):
    """A value model to train: initialised from the policy (a copy of its weights) or, with `config`,
    a fresh model of that (small) config over the same vocabulary. float32, in train mode.

    kind="q" gives a causal LM (the Q-head is its LM head); kind="scalar" a sequence-classification
    model with one output. zero_head starts every value at 0."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    check_choice(kind, "kind", KINDS)
    if policy is None and config is None:
        raise ValueError("new_value_model needs the policy (to copy) or a config (to start fresh)")
    if kind == "q":
        model = AutoModelForCausalLM.from_config(config) if config is not None else copy.deepcopy(policy)
        if zero_head:
            _zero_output_head(model)
    else:
        cfg = copy.deepcopy(config if config is not None else policy.config)
        cfg.num_labels = 1
        if getattr(cfg, "pad_token_id", None) is None:
            cfg.pad_token_id = 0
        model = AutoModelForSequenceClassification.from_config(cfg)
        if config is None:
            source = getattr(policy, policy.base_model_prefix)
            getattr(model, model.base_model_prefix).load_state_dict(source.state_dict())
        if zero_head:
            torch.nn.init.zeros_(model.score.weight)
    return model.float().train()


def train_value_model(
    model,
    rollouts: Rollouts,
    kind: str = "q",
    *,
    steps: int = 200,
    batch_size: int = 64,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    seed: int = 0,
    pad_id: int = 0,
) -> list[float]:
    """Minimise fudge_loss over the rollouts with AdamW on shuffled minibatches of distinct responses
    (see group_rollouts; batch_size counts distinct responses). Returns the losses; the model ends in
    eval mode."""
    check_choice(kind, "kind", KINDS)
    AT_LEAST_ONE.check(steps, "steps")
    AT_LEAST_ONE.check(batch_size, "batch_size")
    POSITIVE.check(lr, "lr")
    if len(rollouts) == 0:
        raise ValueError("no rollouts to train on")
    usable = [i for i, r in enumerate(rollouts.responses) if r]
    if not usable:
        raise ValueError("every rollout is empty: there is no prefix to regress (max_new_tokens >= 1)")
    data, counts = group_rollouts(rollouts.select(usable))
    gen = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay)
    model.train()
    losses, order, at = [], torch.randperm(len(data), generator=gen), 0
    for _ in range(steps):
        if at >= len(order):
            order, at = torch.randperm(len(data), generator=gen), 0
        index = order[at : at + batch_size].tolist()
        at += batch_size
        part = data.select(index)
        values, mask = prefix_values(model, kind, part.prompt_ids, part.responses, pad_id)
        loss = fudge_loss(values, part.rewards.to(values.device), mask, counts[index].to(values.device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    model.eval()
    return losses


# ----------------------------------------------------------------------------- end to end, I/O
@dataclass
class FudgeResult:
    model: object  # the trained value model (transformers)
    kind: str
    rollouts: Rollouts
    losses: list[float] = field(default_factory=list)
    path: Path | None = None  # where it was saved


def train_cd_fudge(
    policy,
    tokenizer,
    prompts,
    reward,
    output_dir=None,
    *,
    kind: str = "q",
    value_model=None,
    value_config=None,
    samples_per_prompt: int = 8,
    max_new_tokens: int = 32,
    temperature: float = 1.0,
    steps: int = 200,
    batch_size: int = 64,
    lr: float = 1e-3,
    seed: int = 0,
    max_rows: int = 64,
) -> FudgeResult:
    """CD-FUDGE end to end: sample rollouts, score them, train a value model, save it.

    The value model is `value_model` if given, else a copy of the policy, else (with value_config) a
    fresh small model. output_dir (optional) receives the model and tokenizer (`save_pretrained`) and
    value_model.json; `load_value_model(output_dir)` gives the decoder-side QValueModel /
    ScalarValueModel.

    Example:
        >>> result = train_cd_fudge(policy, tok, prompts, SentimentReward(), "out/value", steps=300)
        >>> cd = TokenwiseCD(load_value_model("out/value"), strength=2.0)
    """
    check_choice(kind, "kind", KINDS)
    rollouts = sample_rollouts(policy, tokenizer, prompts, reward, samples_per_prompt=samples_per_prompt,
                               max_new_tokens=max_new_tokens, temperature=temperature, seed=seed, max_rows=max_rows)
    model = value_model if value_model is not None else new_value_model(
        None if value_config is not None else policy, kind, value_config)
    pad = getattr(tokenizer, "pad_token_id", None) or 0
    losses = train_value_model(model, rollouts, kind, steps=steps, batch_size=batch_size, lr=lr, seed=seed, pad_id=pad)
    path = None
    if output_dir is not None:
        path = save_value_model(model, output_dir, kind, tokenizer, {
            "method": "cd-fudge", "reward": getattr(reward, "name", type(reward).__name__),
            "samples": len(rollouts), "max_new_tokens": max_new_tokens, "temperature": temperature,
            "steps": steps, "lr": lr, "final_loss": losses[-1], "mean_reward": float(rollouts.rewards.mean()),
        })
    return FudgeResult(model, kind, rollouts, losses, path)


def save_value_model(model, output_dir, kind: str, tokenizer=None, info: dict | None = None) -> Path:
    """save_pretrained the model (and tokenizer) into output_dir, with value_model.json saying its kind."""
    check_choice(kind, "kind", KINDS)
    path = Path(output_dir)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    (path / VALUE_CONFIG).write_text(json.dumps({"kind": kind, **(info or {})}, indent=2))
    return path


def load_value_model(path, tokenizer=None, *, k: int = 10, device=None, dtype=None):
    """The decoder-side value model saved in a local folder: a QValueModel (kind "q") or a
    ScalarValueModel with k candidates (kind "scalar"). The folder's tokenizer is used when present."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    path = Path(path)
    info_file = path / VALUE_CONFIG
    if not info_file.is_file():
        raise FileNotFoundError(f"{str(path)!r} has no {VALUE_CONFIG}: not a value model saved by align-decode")
    kind = check_choice(json.loads(info_file.read_text()).get("kind"), "kind", KINDS)
    if tokenizer is None and (path / "tokenizer_config.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(path)
    loader = AutoModelForCausalLM if kind == "q" else AutoModelForSequenceClassification
    kwargs = {} if dtype is None else {"dtype": dtype}
    model = loader.from_pretrained(path, **kwargs)
    if device is not None:
        model = model.to(device)
    name = str(path)
    if kind == "q":
        return QValueModel(model, tokenizer, name=name)
    return ScalarValueModel(model, tokenizer, k=k, name=name)
