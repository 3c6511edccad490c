"""One row of metrics per setting: reward, win rate against plain sampling, KL, diversity, perplexity, cost."""

from __future__ import annotations

import numpy as np

from align_decode.decoding.candidates import score_completions

from . import metrics
from .generate import EvalContext, Responses, policy_logprobs


def complete(ctx: EvalContext, out: Responses, rewards: dict) -> Responses:
    """Fill in texts, policy log-probs (teacher-forced, for methods whose own log-probs are not the
    policy's) and every named reward of every response (out.extra['rewards'][name])."""
    tok = ctx.policy.tokenizer
    out.texts = tok.batch_decode(out.ids, skip_special_tokens=True)
    if out.policy_logprobs is None:
        out.policy_logprobs = policy_logprobs(ctx, out)
    prompts = [ctx.records[i].text for i in out.prompt_index]
    out.extra["rewards"] = {name: score_completions(r, tok, prompts, out.ids).tolist() for name, r in rewards.items()}
    return out


def summary_row(out: Responses, reward_name: str, plain: Responses | None, pool_rewards: dict | None = None) -> dict:
    r = out.extra["rewards"][reward_name]
    mean, se = metrics.mean_se(r)
    row = {"family": out.family, "label": out.label, "param": out.param, "responses": len(r),
           "reward": mean, "reward_se": se}
    if plain is not None:
        base = {(i, k): v for i, k, v in zip(plain.prompt_index, plain.sample_index, plain.extra["rewards"][reward_name])}
        paired = [(v, base[(i, k)]) for i, k, v in zip(out.prompt_index, out.sample_index, r) if (i, k) in base]
        row["win_rate"] = metrics.win_rate([a for a, _ in paired], [b for _, b in paired])
    if out.kl_kind == "mc":
        kl = metrics.sequence_kl(out.method_logprobs, out.policy_logprobs)
    elif out.kl_kind == "bound":
        kl = [metrics.best_of_n_kl(int(out.param))] * len(r)
    elif out.extra.get("steps") == 0:  # QAlign before any step: each chain holds one plain sample
        kl = [0.0] * len(r)
    else:  # QAlign: its target's KL, from the plain pool of the same prompt
        kl = [metrics.tilted_kl(pool_rewards[i], out.param) for i in out.prompt_index]
    row["kl"], row["kl_se"] = metrics.mean_se(kl)
    row["kl_kind"] = out.kl_kind
    row["distinct_1"] = metrics.distinct_n(out.texts, 1)
    row["distinct_2"] = metrics.distinct_n(out.texts, 2)
    row["perplexity"] = metrics.perplexity(out.policy_logprobs)
    row["length"] = float(np.mean([len(ids) for ids in out.ids]))
    row["compute"] = float(np.mean(out.compute))
    row["reward_calls"] = float(np.mean(out.reward_calls))
    row["seconds_per_response"] = out.seconds / len(r)
    for name, values in out.extra["rewards"].items():
        if name != reward_name:
            row[f"{name}_mean"], row[f"{name}_se"] = metrics.mean_se(values)
    for key in ("steps", "beta"):
        if key in out.extra:
            row[key] = out.extra[key]
    if out.extra.get("acceptance"):
        row["acceptance"] = float(np.mean(out.extra["acceptance"]))
    return row
