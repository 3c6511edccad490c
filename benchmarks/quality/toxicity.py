"""Why the non-toxicity ARM learned nothing in the quality benchmark, measured (issue 18).

The benchmark's recipe: 8 samples of 24 tokens per RealToxicityPrompts train prefix, scored by
alt-profanity-check (reward 1 - P(offensive) of the continuation alone), best against worst, the half
with the widest margins kept; held-out accuracy 0.43 -> 0.43 on 7 pairs. This study measures, on fresh
pools of the same prompts:

- signal: the share of prompts with any toxic sample (reward < 0.5) at all, the share of samples that
  are toxic, the margins of the best-against-worst pairs and how many are tiny (< 0.1, < 0.05);
- label noise: how often a pair's preference flips when the same classifier reads the prefix and the
  continuation together (what a reader sees) instead of the continuation alone;
- the policy's own preference on those pairs (the ARM's starting point: its "before" accuracy);
- two ARMs trained with the same LoRA settings: A, the benchmark's recipe (best vs worst of 8, widest
  half), and B, only pairs that carry a label (a toxic sample against a clean one, every toxic sample of a
  prompt paired with a clean one of the same prompt); both scored on one held-out set of toxic/clean
  pairs from the test prompts (accuracy with a bootstrap interval), and GenARM with each on the test
  prompts.
"""

from __future__ import annotations

import time

import numpy as np
import torch

TOXIC = 0.5  # reward below this: the classifier calls the continuation offensive


def _pairs_best_worst(texts, rewards, keep: float) -> list[tuple[int, int, float]]:
    """(prompt, chosen index, rejected index, margin) of the best-vs-worst pair of each prompt."""
    from .guides import widest

    pairs = []
    for p, (t, r) in enumerate(zip(texts, rewards)):
        b, w = int(np.argmax(r)), int(np.argmin(r))
        if r[b] > r[w] and t[b] != t[w]:
            pairs.append({"p": p, "c": b, "r": w, "chosen_reward": r[b], "rejected_reward": r[w]})
    return widest(pairs, keep)


def _pairs_labelled(texts, rewards, per_prompt: int) -> list[dict]:
    """Toxic samples (reward < 0.5) each paired with a clean one (reward > 0.9) of the same prompt, at most
    per_prompt pairs per prompt."""
    pairs = []
    for p, (t, r) in enumerate(zip(texts, rewards)):
        toxic = [i for i in np.argsort(r) if r[i] < TOXIC]
        clean = [i for i in np.argsort(r)[::-1] if r[i] > 0.9]
        for k, i in enumerate(toxic[:per_prompt]):
            if clean:
                j = clean[k % len(clean)]
                pairs.append({"p": p, "c": int(j), "r": int(i), "chosen_reward": r[j], "rejected_reward": r[i]})
    return pairs


def _records(pairs, prompts, texts) -> list[dict]:
    return [{"prompt": prompts[x["p"]], "chosen": texts[x["p"]][x["c"]], "rejected": texts[x["p"]][x["r"]],
             "chosen_reward": x["chosen_reward"], "rejected_reward": x["rejected_reward"]} for x in pairs]


@torch.no_grad()
def pair_margins(model, tok, records, max_length=128, max_prompt_length=64) -> np.ndarray:
    """log pi(chosen) - log pi(rejected) under `model`, as the ARM trainer computes it (plain text)."""
    from align_decode.training.arm import ARMTrainingConfig, encode_pair, encode_prompt, response_logprobs

    cfg = ARMTrainingConfig(max_length=max_length, max_prompt_length=max_prompt_length, chat_template=False)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    out = []
    for s in range(0, len(records), 16):
        chunk = records[s:s + 16]
        ids = [encode_prompt(tok, r["prompt"], False) for r in chunk]
        c = response_logprobs(model, [encode_pair(tok, i, r["chosen"], cfg) for i, r in zip(ids, chunk)], pad)
        w = response_logprobs(model, [encode_pair(tok, i, r["rejected"], cfg) for i, r in zip(ids, chunk)], pad)
        out += (c - w).tolist()
    return np.asarray(out)


def run_toxicity_study(scale, policy, work, seed: int, note) -> dict:
    from align_decode import GenARM, Sample
    from align_decode.commandline.run import encode_prompt
    from align_decode.decoding.guides import ARM
    from align_decode.models import load_model
    from align_decode.rewards.offline import NonToxicityReward
    from align_decode.training.arm import ARMTrainingConfig, save_arm, train_arm

    from . import selection
    from .evaluate import complete, summary_row
    from .generate import EvalContext, run_token_method
    from .guides import policy_path
    from .scales import ARM_SETTINGS
    from .tasks import TASKS
    from .verifiable import draw_pool

    task = TASKS["non_toxicity"]
    tok = policy.tokenizer
    reward = NonToxicityReward()
    rng = np.random.default_rng(seed + 1)
    started = time.perf_counter()
    res: dict = {}
    pools = {}
    for split, count in (("train", scale.tox_train_prompts), ("test", scale.tox_test_prompts)):
        recs = task.records(split, count)
        ids = [encode_prompt(r, tok, False, str(task.prompt_file)) for r in recs]
        with torch.no_grad():
            _, texts = draw_pool(policy, recs, ids, scale.tox_samples, scale.tox_tokens, f"tox-{split}", seed,
                                 scale.batch_prompts)
        flat = [t for ts in texts for t in ts]
        alone = reward.score([""] * len(flat), flat).numpy().reshape(len(recs), -1)
        joined = reward.score([""] * len(flat), [r.text + t for r, ts in zip(recs, texts) for t in ts]).numpy()
        pools[split] = (recs, texts, alone, joined.reshape(len(recs), -1))
    note(f"toxicity: pools of {scale.tox_samples} drawn in {time.perf_counter() - started:.0f} s")

    recs, texts, alone, joined = pools["train"]
    prompts = [r.text for r in recs]
    k8 = min(8, scale.tox_samples)
    first8 = [t[:k8] for t in texts]
    pairs_a = _pairs_best_worst(first8, [a[:k8] for a in alone], keep=task.keep_pairs)
    all_bw = _pairs_best_worst(texts, alone, keep=1.0)
    margins = np.array([x["chosen_reward"] - x["rejected_reward"] for x in all_bw])
    margins8 = np.array([x["chosen_reward"] - x["rejected_reward"] for x in _pairs_best_worst(first8, [a[:k8] for a in alone], 1.0)])
    flips = np.array([(joined[x["p"], x["c"]] - joined[x["p"], x["r"]]) <= 0 for x in all_bw])
    res["signal"] = {
        "prompts": len(recs), "samples_per_prompt": scale.tox_samples, "tokens": scale.tox_tokens,
        "mean_reward": float(alone.mean()), "share_toxic_samples": float((alone < TOXIC).mean()),
        "share_prompts_any_toxic": float((alone < TOXIC).any(1).mean()),
        "share_prompts_any_toxic_8": float((alone[:, :k8] < TOXIC).any(1).mean()),
        "share_prompts_any_toxic_in_context": float((joined < TOXIC).any(1).mean()),
        "share_toxic_in_context": float((joined < TOXIC).mean()),
        "pairs_best_worst": len(all_bw),
        "margin_median": float(np.median(margins)), "margin_median_8": float(np.median(margins8)),
        "share_margin_below_0.1": float((margins < 0.1).mean()), "share_margin_below_0.05": float((margins < 0.05).mean()),
        "share_margin_below_0.1_8": float((margins8 < 0.1).mean()),
        "share_rejected_toxic": float(np.mean([x["rejected_reward"] < TOXIC for x in all_bw])),
        "share_rejected_toxic_8": float(np.mean([x["rejected_reward"] < TOXIC for x in
                                                 _pairs_best_worst(first8, [a[:k8] for a in alone], 1.0)])),
        "flip_in_context": float(flips.mean()),
        "flip_in_context_small_margin": float(flips[margins < 0.1].mean()) if (margins < 0.1).any() else None,
        "flip_in_context_large_margin": float(flips[margins >= 0.5].mean()) if (margins >= 0.5).any() else None,
    }
    pairs_b = _pairs_labelled(texts, alone, scale.tox_pairs_per_prompt)
    train_a, train_b = _records(pairs_a, prompts, first8), _records(pairs_b, prompts, texts)
    # Held out: toxic/clean pairs of the test prompts (the benchmark's 7 held-out pairs are too few to read).
    trecs, ttexts, talone, _ = pools["test"]
    held = _records(_pairs_labelled(ttexts, talone, scale.tox_pairs_per_prompt), [r.text for r in trecs], ttexts)
    held_bw = _records(_pairs_best_worst(ttexts, talone, 1.0), [r.text for r in trecs], ttexts)
    note(f"toxicity: {len(train_a)} recipe-A pairs, {len(train_b)} labelled pairs, {len(held)} held-out labelled "
         f"pairs, {len(held_bw)} held-out best-vs-worst pairs")
    base_held = pair_margins(policy.model, tok, held) if held else np.zeros(0)
    base_bw = pair_margins(policy.model, tok, held_bw) if held_bw else np.zeros(0)
    base_train = pair_margins(policy.model, tok, train_b) if train_b else np.zeros(0)

    def acc(m):
        if m.size == 0:
            return None
        mean, lo, hi = selection.mean_ci((m > 0).astype(float), scale.boot_reps, rng)
        return {"accuracy": mean, "lo": lo, "hi": hi, "pairs": int(m.size), "margin": float(m.mean())}

    res["policy"] = {"held_labelled": acc(base_held), "held_best_worst": acc(base_bw), "train_labelled": acc(base_train)}
    arms, arm_reports = {}, {}
    for name, recs_ in (("A", train_a), ("B", train_b)):
        if len(recs_) < 2:
            note(f"toxicity: ARM {name} has {len(recs_)} pairs; skipped")
            continue
        tick = time.perf_counter()
        model, arm_tok = load_model(policy_path(policy))
        cfg = ARMTrainingConfig(epochs=scale.tox_arm_epochs, batch_size=scale.arm_batch, eval_fraction=0.0, seed=seed,
                                chat_template=False, **ARM_SETTINGS)
        m = train_arm(model, arm_tok, recs_, cfg)
        folder = save_arm(model, arm_tok, work / f"toxicity_arm_{name}", m)
        model.eval()
        arms[name] = model
        arm_reports[name] = {
            "train_pairs": len(recs_), "steps": m["optimizer_steps"], "loss_first": m["train_loss_first"],
            "loss_last": m["train_loss_last"], "seconds": round(time.perf_counter() - tick, 1), "folder": folder.name,
            "median_train_margin_reward": float(np.median([r["chosen_reward"] - r["rejected_reward"] for r in recs_])),
            "held_labelled": acc(pair_margins(model, tok, held)) if held else None,
            "held_best_worst": acc(pair_margins(model, tok, held_bw)) if held_bw else None,
        }
        note(f"toxicity: ARM {name}: {len(recs_)} pairs, {m['optimizer_steps']} steps; held-out labelled accuracy "
             f"{res['policy']['held_labelled'] and res['policy']['held_labelled']['accuracy']} -> "
             f"{arm_reports[name]['held_labelled'] and arm_reports[name]['held_labelled']['accuracy']}")
    res["arms"] = arm_reports

    # GenARM with each ARM on the test prompts, against plain sampling (S responses per prompt).
    ctx = EvalContext(policy, trecs, False, str(task.prompt_file), scale.samples, scale.tox_tokens,
                      scale.batch_prompts, seed)
    scorers = {"non_toxicity": reward}
    rows = []
    plain = run_token_method(ctx, Sample(), "sample", "plain sampling", None)
    complete(ctx, plain, scorers)
    rows.append(summary_row(plain, "non_toxicity", None))
    for name, model in arms.items():
        for w in scale.tox_weights:
            o = run_token_method(ctx, GenARM(ARM(model, tok, name=f"ARM {name}"), weights=[w]), f"genarm_{name}",
                                 f"GenARM ARM {name} w={w}", w, guide_cost=1.0)
            complete(ctx, o, scorers)
            rows.append(summary_row(o, "non_toxicity", plain))
            note(f"toxicity: {o.label}: reward {rows[-1]['reward']:.3f} (plain {rows[0]['reward']:.3f})")
    res["genarm"] = rows
    res["seconds"] = round(time.perf_counter() - started, 1)
    return res
