"""Training the benchmark's guides on a task's train split: an ARM (GenARM) and a CD-FUDGE value model.

One pool of K policy samples per train prompt, scored by the task's reward, feeds both: its best and
worst samples make the preference pairs (`align_decode.training.preferences`, as `align-decode make-preferences`
does) and all of its samples are the value model's rollouts (as `align-decode train-value` does). The
ARM is LoRA on SmolLM2 merged into a plain folder (`train_arm` / `save_arm`, as `align-decode
train-arm`); the value model is a scalar prefix scorer on SmolLM2's first layers. A task with a second
objective also gets a second ARM, from the same samples scored by the second reward.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from align_decode.decoding import Policy
from align_decode.models import load_model
from align_decode.training.preferences import PreferenceSettings, PromptSamples, pick_pair, sample_preferences
from align_decode.training.arm import ARMTrainingConfig, save_arm, train_arm
from align_decode.training.arm import truncate_layers
from align_decode.training.value import Rollouts, new_value_model, save_value_model, train_value_model
from align_decode.commandline.run import encode_prompt, prompt_seed

from .scales import ARM_SETTINGS, VALUE_SETTINGS, Scale
from .tasks import Task


@dataclass
class TrainedGuides:
    arm_dir: Path
    value_dir: Path
    report: dict  # what training measured (pairs, held-out accuracy, losses, seconds)
    second_arm_dir: Path | None = None  # the ARM for the task's second objective


def guide_folders(task: Task, work: Path) -> list[Path]:
    folders = [work / f"{task.name}_arm", work / f"{task.name}_value"]
    if task.second_objective is not None:
        folders.append(work / f"{task.name}_{task.second_name}_arm")
    return folders


def train_guides(task: Task, scale: Scale, policy: Policy, work: Path, seed: int, note) -> TrainedGuides:
    records = task.records("train", scale.train_prompts)
    reward = task.reward()
    tok = policy.tokenizer
    prompt_ids = [encode_prompt(r, tok, task.chat_template, task.prompt_file) for r in records]
    settings = PreferenceSettings(samples=scale.train_samples, max_new_tokens=scale.max_new_tokens,
                                  batch_size=scale.batch_prompts, seed=seed)
    second = task.second_reward()
    seeds = [prompt_seed(seed, f"train/{r.key}") for r in records]
    started = time.perf_counter()
    pairs, second_pairs, rollout_prompts, rollout_ids, rollout_rewards = [], [], [], [], []
    with torch.no_grad():
        for s in sample_preferences(policy, prompt_ids, [r.text for r in records], seeds, reward, settings):
            record = records[s.index]
            prompt = record.messages if record.messages is not None else record.prompt
            line = s.line(record.id, prompt)
            if line is not None:
                pairs.append(line)
            if second is not None:
                r2 = second.score([record.text] * len(s.texts), s.texts).tolist()
                line = PromptSamples(s.index, s.texts, r2, pick_pair(r2, s.texts)).line(record.id, prompt)
                if line is not None:
                    second_pairs.append(line)
            rollout_prompts += [prompt_ids[s.index]] * len(s.responses)
            rollout_ids += s.responses
            rollout_rewards += s.rewards
    sampled = time.perf_counter()
    pairs = widest(pairs, task.keep_pairs)
    note(f"{task.name}: {len(rollout_ids)} train samples, {len(pairs)} pairs in {sampled - started:.0f} s")

    arm_dir, arm_report = _train_arm(task, scale, policy, pairs, work / f"{task.name}_arm", seed, note)
    second_dir = second_report = None
    if second is not None:
        second_dir, second_report = _train_arm(task, scale, policy, second_pairs,
                                               work / f"{task.name}_{task.second_name}_arm", seed, note)
    arm_done = time.perf_counter()

    # The value model: CD-FUDGE regression of every prefix of the pool's samples onto their reward.
    rollouts = Rollouts(rollout_prompts, rollout_ids, torch.tensor(rollout_rewards, dtype=torch.float64))
    value = truncate_layers(new_value_model(policy.model, VALUE_SETTINGS["kind"]), VALUE_SETTINGS["layers"])
    losses = train_value_model(value, rollouts, VALUE_SETTINGS["kind"], steps=scale.value_steps,
                               batch_size=VALUE_SETTINGS["batch_size"], lr=VALUE_SETTINGS["lr"], seed=seed,
                               pad_id=tok.pad_token_id or 0)
    tail = losses[-min(10, len(losses)):]
    value_info = {"steps": scale.value_steps, "first_loss": losses[0], "final_loss": sum(tail) / len(tail),
                  "constant_loss": float(0.5 * rollouts.rewards.var(unbiased=False)),
                  "layers": VALUE_SETTINGS["layers"], "rollouts": len(rollouts)}
    value_dir = save_value_model(value, work / f"{task.name}_value", VALUE_SETTINGS["kind"], tok, value_info)
    value_done = time.perf_counter()
    note(f"{task.name}: value model trained in {value_done - arm_done:.0f} s; loss {value_info['first_loss']:.4f} -> "
         f"{value_info['final_loss']:.4f} (predicting the mean: {value_info['constant_loss']:.4f})")
    report = {
        "train_prompts": len(records), "samples_per_prompt": scale.train_samples, "pairs": len(pairs),
        "train_mean_reward": float(rollouts.rewards.mean()),
        "sampling_seconds": round(sampled - started, 1),
        "keep_pairs": task.keep_pairs,
        "arm": arm_report,
        "value": {"seconds": round(value_done - arm_done, 1), **value_info},
    }
    if second is not None:
        report["second_objective"] = {"reward": task.second_objective, "pairs": len(second_pairs),
                                      "arm": second_report}
    return TrainedGuides(arm_dir, value_dir, report, second_dir)


def widest(pairs: list[dict], share: float) -> list[dict]:
    """The share (at least one) of the pairs with the widest reward margins, in their original order."""
    if share >= 1 or not pairs:
        return pairs
    keep = max(1, round(len(pairs) * share))
    order = sorted(range(len(pairs)), key=lambda i: pairs[i]["rejected_reward"] - pairs[i]["chosen_reward"])
    return [pairs[i] for i in sorted(order[:keep])]


def _train_arm(task: Task, scale: Scale, policy: Policy, pairs: list, folder: Path, seed: int, note):
    """LoRA on a fresh copy of the policy (adapters wrap the model's layers in place), merged and saved."""
    started = time.perf_counter()
    arm_model, arm_tok = load_model(policy_path(policy))
    config = ARMTrainingConfig(epochs=scale.arm_epochs, batch_size=scale.arm_batch, eval_fraction=0.15, seed=seed,
                               chat_template=task.chat_template, **ARM_SETTINGS)
    m = train_arm(arm_model, arm_tok, pairs, config)
    arm_dir = save_arm(arm_model, arm_tok, folder, m)
    seconds = time.perf_counter() - started
    note(f"{task.name}: ARM {folder.name} trained on {m['train_pairs']} pairs in {seconds:.0f} s; held-out "
         f"accuracy {m.get('eval_before', {}).get('accuracy', float('nan')):.2f} -> "
         f"{m.get('eval_after', {}).get('accuracy', float('nan')):.2f}")
    return arm_dir, {"seconds": round(seconds, 1), "train_pairs": m["train_pairs"], "eval_pairs": m["eval_pairs"],
                     "steps": m["optimizer_steps"], "loss_first": m["train_loss_first"],
                     "loss_last": m["train_loss_last"], "eval_before": m.get("eval_before"),
                     "eval_after": m.get("eval_after"),
                     "config": {k: m["config"][k] for k in ("beta_r", "lr", "lora_r", "epochs", "batch_size")}}


def policy_path(policy: Policy) -> str:
    return policy.model.config._name_or_path
