"""Training an autoregressive reward model (ARM) with the GenARM objective.

The ARM pi_r is a causal LM over the policy's vocabulary; its reward is the summed token log-prob
r(x, y) = sum_t log pi_r(y_t | x, y_<t). On preference pairs (x, y_w preferred to y_l) the loss is a
DPO-style loss without a reference model:

    delta = r(x, y_w) - r(x, y_l) - gamma / beta_r
    loss  = -(1 - eps) log sigmoid(beta_r * delta) - eps log sigmoid(-beta_r * delta)   ("sigmoid")
          = max(0, 1 - beta_r * delta)                                               ("hinge")

Log-probs are summed over the response tokens (the official default); `length_normalize` averages
instead, which the official code flags as for testing only. The ARM starts from the policy itself (LoRA
or full fine-tuning) or from its first layers (a small, fast ARM), and is saved as a plain model folder
that `ARM(...)` loads directly.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from ..validation import AT_LEAST_ONE, NON_NEGATIVE_INT, POSITIVE, Bounds, check_choice
from .lora import add_lora, merge_lora

LOSS_TYPES = ("sigmoid", "hinge")


def arm_loss(chosen: torch.Tensor, rejected: torch.Tensor, beta_r: float, gamma: float = 0.0,
             label_smoothing: float = 0.0, loss_type: str = "sigmoid") -> torch.Tensor:
    """Per-pair GenARM loss from the summed (or averaged) response log-probs [B] of chosen and rejected."""
    delta = chosen - rejected - gamma / beta_r
    if loss_type == "hinge":
        return F.relu(1 - beta_r * delta)
    return -(1 - label_smoothing) * F.logsigmoid(beta_r * delta) - label_smoothing * F.logsigmoid(-beta_r * delta)


@dataclass
class ARMTrainingConfig:
    """Settings of `train_arm`; every field is validated."""

    beta_r: float = 0.1
    gamma: float = 0.0
    label_smoothing: float = 0.0
    loss_type: str = "sigmoid"
    length_normalize: bool = False
    lr: float = 5e-4
    epochs: int = 1
    batch_size: int = 4
    grad_accum: int = 1
    max_length: int = 256
    max_prompt_length: int = 128
    lora_r: int = 8  # 0: full fine-tuning
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    eval_fraction: float = 0.1
    seed: int = 0
    chat_template: bool = True

    def __post_init__(self):
        POSITIVE.check(self.beta_r, "beta_r")
        Bounds(ge=0, lt=0.5).check(self.label_smoothing, "label_smoothing")
        check_choice(self.loss_type, "loss_type", LOSS_TYPES)
        POSITIVE.check(self.lr, "lr")
        for name in ("epochs", "batch_size", "grad_accum", "max_length", "max_prompt_length"):
            AT_LEAST_ONE.check(getattr(self, name), name)
        if not self.max_prompt_length < self.max_length:
            raise ValueError(f"max_prompt_length ({self.max_prompt_length}) must be < max_length ({self.max_length})")
        NON_NEGATIVE_INT.check(self.lora_r, "lora_r")  # 0: full fine-tuning
        Bounds(ge=0, lt=1).check(self.eval_fraction, "eval_fraction")


def load_preferences(path: str | Path) -> list[dict]:
    """(prompt, chosen, rejected) records from JSONL; a bad line is an error naming file and line."""
    records = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{number}: not valid JSON ({e.msg})") from None
            missing = [k for k in ("prompt", "chosen", "rejected") if not isinstance(rec, dict) or k not in rec]
            if missing:
                raise ValueError(f"{path}:{number}: missing field(s) {', '.join(missing)}")
            if not all(isinstance(rec[k], str) for k in ("chosen", "rejected")):
                raise ValueError(f"{path}:{number}: chosen and rejected must be strings")
            if not isinstance(rec["prompt"], (str, list)):
                raise ValueError(f"{path}:{number}: prompt must be a string or a list of chat messages")
            records.append(rec)
    if not records:
        raise ValueError(f"{path}: no preference pairs")
    return records


def encode_prompt(tokenizer, prompt, chat_template: bool = True) -> list[int]:
    """Prompt token ids the way the decoders see them: the chat template when the tokenizer has one."""
    if chat_template and getattr(tokenizer, "chat_template", None):
        messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return list(out["input_ids"] if hasattr(out, "keys") else out)
    text = prompt if isinstance(prompt, str) else "\n".join(m["content"] for m in prompt)
    return tokenizer(text)["input_ids"]


def encode_pair(tokenizer, prompt_ids: list[int], response: str, cfg: ARMTrainingConfig) -> tuple[list[int], int]:
    """(ids of prompt + response + EOS, index of the first response token), truncated to the limits."""
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        response_ids = response_ids + [tokenizer.eos_token_id]
    prompt_ids = prompt_ids[-cfg.max_prompt_length:]  # keep the end of the prompt, next to the response
    response_ids = response_ids[: cfg.max_length - len(prompt_ids)]
    return prompt_ids + response_ids, len(prompt_ids)


def response_logprobs(model, sequences: Sequence[tuple[list[int], int]], pad_id: int,
                      length_normalize: bool = False) -> torch.Tensor:
    """Summed (or averaged) log pi(y_t | x, y_<t) over each sequence's response tokens [B]."""
    width = max(len(ids) for ids, _ in sequences)
    device = next(model.parameters()).device
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long, device=device)
    attn = torch.zeros_like(ids)
    resp = torch.zeros_like(ids, dtype=torch.bool)
    for i, (seq, start) in enumerate(sequences):
        ids[i, : len(seq)] = torch.tensor(seq)
        attn[i, : len(seq)] = 1
        resp[i, start: len(seq)] = True
    logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1].float()
    token_lp = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    mask = resp[:, 1:]
    total = (token_lp * mask).sum(-1)
    return total / mask.sum(-1).clamp(min=1) if length_normalize else total


def truncate_layers(model, layers: int):
    """Keep the first `layers` transformer blocks (a small ARM that starts from the policy's weights)."""
    blocks = model.model.layers
    Bounds(ge=1, le=len(blocks), integer=True).check(layers, "layers")
    model.model.layers = blocks[:layers]
    model.config.num_hidden_layers = layers
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = model.config.layer_types[:layers]
    return model


def _evaluate(model, batches, cfg, pad_id) -> dict:
    losses, correct, margins, total = 0.0, 0, 0.0, 0
    with torch.no_grad():
        for chosen, rejected in batches:
            c = response_logprobs(model, chosen, pad_id, cfg.length_normalize)
            r = response_logprobs(model, rejected, pad_id, cfg.length_normalize)
            losses += float(arm_loss(c, r, cfg.beta_r, cfg.gamma, cfg.label_smoothing, cfg.loss_type).sum())
            correct += int((c > r).sum())
            margins += float((c - r).sum())
            total += len(chosen)
    return {"loss": losses / max(total, 1), "accuracy": correct / max(total, 1), "margin": margins / max(total, 1),
            "pairs": total}


def train_arm(model, tokenizer, records: list[dict], cfg: ARMTrainingConfig | None = None,
              log: Callable[[str], None] | None = None) -> dict:
    """Train `model` in place as an ARM on preference records; returns metrics (before/after, held out).

    With cfg.lora_r > 0 only adapters train; call `save_arm` to merge them and write the folder.
    """
    cfg = cfg or ARMTrainingConfig()
    log = log or (lambda message: None)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    rng = random.Random(cfg.seed)
    torch.manual_seed(cfg.seed)
    encoded = []
    for rec in records:
        prompt_ids = encode_prompt(tokenizer, rec["prompt"], cfg.chat_template)
        encoded.append((encode_pair(tokenizer, prompt_ids, rec["chosen"], cfg),
                        encode_pair(tokenizer, prompt_ids, rec["rejected"], cfg)))
    rng.shuffle(encoded)
    held = int(round(len(encoded) * cfg.eval_fraction))
    evaluation, training = encoded[:held], encoded[held:]
    if not training:
        raise ValueError(f"no training pairs left after holding out {held} for evaluation")

    def batches(items):
        for i in range(0, len(items), cfg.batch_size):
            chunk = items[i: i + cfg.batch_size]
            yield [c for c, _ in chunk], [r for _, r in chunk]

    if cfg.lora_r > 0:
        add_lora(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    metrics = {"config": asdict(cfg), "train_pairs": len(training), "eval_pairs": held}
    model.eval()  # no dropout in the base model; LoRA dropout is the only stochastic part
    if evaluation:
        metrics["eval_before"] = _evaluate(model, list(batches(evaluation)), cfg, pad_id)
        log(f"held-out before: {metrics['eval_before']}")
    step, history = 0, []
    for epoch in range(cfg.epochs):
        rng.shuffle(training)
        optimizer.zero_grad()
        for i, (chosen, rejected) in enumerate(batches(training), 1):
            c = response_logprobs(model, chosen, pad_id, cfg.length_normalize)
            r = response_logprobs(model, rejected, pad_id, cfg.length_normalize)
            loss = arm_loss(c, r, cfg.beta_r, cfg.gamma, cfg.label_smoothing, cfg.loss_type).mean()
            (loss / cfg.grad_accum).backward()
            if i % cfg.grad_accum == 0:
                optimizer.step()
                optimizer.zero_grad()
                step += 1
            history.append(loss.item())
            if i % 10 == 0:
                log(f"epoch {epoch + 1} batch {i}: loss {sum(history[-10:]) / len(history[-10:]):.4f}")
        if i % cfg.grad_accum:
            optimizer.step()
            optimizer.zero_grad()
            step += 1
    metrics["optimizer_steps"] = step
    metrics["train_loss_first"] = history[0]
    metrics["train_loss_last"] = sum(history[-5:]) / len(history[-5:])
    if evaluation:
        metrics["eval_after"] = _evaluate(model, list(batches(evaluation)), cfg, pad_id)
        log(f"held-out after: {metrics['eval_after']}")
    return metrics


def save_arm(model, tokenizer, out_dir: str | Path, metrics: dict | None = None) -> Path:
    """Merge any LoRA adapters and save a plain model folder the decoders load as an ARM."""
    out = Path(out_dir)
    merge_lora(model)
    for p in model.parameters():
        p.requires_grad_(False)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    if metrics is not None:
        (out / "arm_training.json").write_text(json.dumps(metrics, indent=2, default=str))
    return out
