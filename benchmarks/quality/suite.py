"""Which settings of which methods run on a task, and the two-ARM weight sweep."""

from __future__ import annotations

from align_decode import ARGS, GenARM, Sample, TokenwiseCD, TransferQ
from align_decode.models import load_model
from align_decode.decoding.guides import ARM, PromptedARM
from align_decode.training import load_value_model

from .evaluate import complete, summary_row
from .generate import EvalContext, run_best_of_n, run_qalign, run_token_method

# Candidates per step of the top-k methods: ARGS's paper value, and the scalar value model's.
TOP_K = 10


def _checkpoints(steps: int) -> list[int]:
    points, k = [0], 1
    while k < steps:
        points.append(k)
        k *= 2
    return points + [steps] if steps else points


def evaluate_task(task, scale, policy, guides, seed: int, note):
    records = task.records("test", scale.test_prompts)
    ctx = EvalContext(policy, records, task.chat_template, str(task.prompt_file), scale.samples,
                      scale.max_new_tokens, scale.batch_prompts, seed)
    reward = task.reward()
    scorers = {task.reward_spec: reward}
    judge = task.make_judge()
    if judge is not None:
        scorers[judge.name] = judge
    if task.second_objective is not None:  # every method's responses are read on it too
        scorers[task.second_objective] = task.second_reward()
    rows = []

    def record(out, plain=None, pool=None):
        complete(ctx, out, scorers)
        row = summary_row(out, task.reward_spec, plain, pool)
        row["reward_name"] = task.reward_spec
        rows.append(row)
        note(f"{task.name}: {out.label}: reward {row['reward']:.4f} ± {row['reward_se']:.4f}, "
             f"KL {row['kl']:.3f}, {out.seconds:.0f} s")
        return out

    tok = policy.tokenizer
    plain = record(run_token_method(ctx, Sample(), "sample", "plain sampling", None))
    bon, pool = run_best_of_n(ctx, reward, scale.bon_n)
    for out in bon:
        record(out, plain, pool)
    for beta in scale.qalign_betas:
        for out in run_qalign(ctx, reward, beta, scale.qalign_steps, _checkpoints(scale.qalign_steps)):
            record(out, plain, pool)

    arm_model, _ = load_model(guides.arm_dir)
    arm = ARM(arm_model, tok, name=f"{task.name} ARM")
    for w in scale.genarm_weights:
        record(run_token_method(ctx, GenARM(arm, weights=[w]), "genarm_trained", f"GenARM trained ARM w={w}", w,
                                guide_cost=ctx.size_of(arm_model)), plain)
    # Control: the ARM before training is the policy itself, and GenARM with it is the policy at
    # temperature 1 / (1 + w). What the trained ARM adds beyond that sharpening is the training's doing.
    untrained = ARM(policy.model, tok, name="untrained ARM (the policy)")
    w0 = scale.genarm_weights[len(scale.genarm_weights) // 2]
    record(run_token_method(ctx, GenARM(untrained, weights=[w0]), "genarm_untrained", f"GenARM untrained ARM w={w0}",
                            w0, guide_cost=1.0), plain)
    prompted = PromptedARM(policy.model, tok, task.instruction, name="prompted ARM")
    for w in scale.genarm_weights:
        record(run_token_method(ctx, GenARM(prompted, weights=[w]), "genarm_prompted", f"GenARM prompted ARM w={w}",
                                w, guide_cost=1.0), plain)

    value = load_value_model(guides.value_dir, k=TOP_K)
    for lam in scale.cd_weights:
        record(run_token_method(ctx, TokenwiseCD(value, strength=lam), "cd_tokenwise", f"CD tokenwise lambda={lam}",
                                lam, guide_cost=TOP_K * ctx.size_of(value.model)), plain)
    for w in scale.args_weights:
        record(run_token_method(ctx, ARGS(reward, weight=w, k=TOP_K), "args", f"ARGS w={w}", w,
                                reward_calls_per_token=TOP_K), plain)
    for alpha in scale.tq_alphas:
        # No aligned baseline model exists here: the policy rolls its own candidates out (direct transfer
        # with rho_BL = the policy), i.e. Q from short greedy lookaheads of the policy.
        tq = TransferQ(policy.model, reward, baseline_tokenizer=tok, alpha=alpha, k=scale.tq_k,
                       rollout_len=scale.tq_rollout_len)
        record(run_token_method(ctx, tq, "transfer_q", f"Transfer Q* alpha={alpha} k={scale.tq_k} "
                                f"H={scale.tq_rollout_len}", alpha, reward_calls_per_token=scale.tq_k,
                                limit=scale.tq_prompts, rollout_accounting=True), plain)
    ctx.plain, ctx.arm_model, ctx.scorers = plain, arm_model, scorers
    return rows, ctx


def multi_objective(scale, ctx, task, guides, note):
    """GenARM with the task's ARM and its second objective's ARM together on the task's held-out
    prompts, the weights swept from one to the other; both rewards read on the same responses."""
    tok = ctx.policy.tokenizer
    second_model, _ = load_model(guides.second_arm_dir)
    arms = [ARM(ctx.arm_model, tok, name=f"{task.reward_spec} ARM"),
            ARM(second_model, tok, name=f"{task.second_objective} ARM")]
    rows = []
    for w in scale.multi_weights:
        out = run_token_method(ctx, GenARM(arms, weights=list(w)), "genarm_multi", f"GenARM weights={w}", None,
                               guide_cost=sum(ctx.size_of(a.model) for a, x in zip(arms, w) if x))
        complete(ctx, out, ctx.scorers)
        row = summary_row(out, task.reward_spec, ctx.plain)
        row.update(reward_name=task.reward_spec, weights=list(w))
        rows.append(row)
        note(f"multi-objective {w}: {task.reward_spec} {row['reward']:.4f}, "
             f"{task.second_objective} {row[task.second_objective + '_mean']:.4f}")
    return rows
