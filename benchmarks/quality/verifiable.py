"""The quality benchmark on a task with a verifiable answer (issue 18): instruction following checked by a
program, the over-optimisation curve of best-of-N pushed to N = 256, and why the non-toxicity ARM learns
nothing.

    python -m benchmarks.quality.verifiable --full    # the numbers and plots in benchmarks/RESULTS.md
    python -m benchmarks.quality.verifiable --smoke   # the same pipeline, reduced (CI, a few minutes)

Task (data/ifeval_prompts.jsonl): short requests with one or two IFEval-style instructions each, checked
by `align_decode.rewards.instructions`. Judge: the strict verifier (1 when every instruction passes).
Proxies (what the methods optimise; neither is the judge):
- soft: the cheap partial checker's mean score (case share, keyword share, comma and word-count
  penalties, quote marks, start / end phrase found anywhere);
- ARM: a reward model learned here, the log-likelihood ratio log pi_ARM(y|x) - log p(y|x) of the ARM
  that GenARM uses, trained on verifier-labelled pairs of the policy's own samples on the train prompts.

Steps: (1) sample the train prompts, label pairs with the verifier, train the ARM (LoRA, GenARM loss);
(2) one pool of samples per held-out prompt: best-of-N (exact, by order statistics), majority and
weighted-majority votes (Monte Carlo) at N = 1 .. pool; (3) plain sampling, GenARM (trained ARM, and the
untrained control), QAlign on the soft proxy at several step counts; (4) over-optimisation: the held-out
prompts where proxy and judge disagree most (measured on the first pool) get a fresh pool of 512 samples
each, best-of-N for N up to 256 with both proxies, bootstrap intervals, and long QAlign chains;
(5) the non-toxicity ARM study (`toxicity.py`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
TASK_FILE = HERE / "data" / "ifeval_prompts.jsonl"


def _parse(argv):
    from .scales import scale_parser

    p = scale_parser("python -m benchmarks.quality.verifiable", __doc__.split("\n")[0], "ARMs")
    p.add_argument("--out", type=Path, help="results folder [default: benchmarks/quality/results/verifiable for "
                   "--full, else a folder beside the trained ARMs]")
    p.add_argument("--skip-toxicity", action="store_true", help="leave out the non-toxicity ARM study")
    return p.parse_args(argv)


class _Task:
    """What guides._train_arm and EvalContext need to know about the task."""

    name = "ifeval"
    chat_template = True
    prompt_file = TASK_FILE


def instruction_table(records) -> dict[str, list[dict]]:
    return {r.text: r.meta["instructions"] for r in records}


def score_texts(records, prompt_index, texts) -> dict[str, list[float]]:
    """strict (judge), partial and soft (proxy) scores of each text."""
    from align_decode.rewards.instructions import evaluate

    out = {"strict": [], "partial": [], "soft": []}
    for i, t in zip(prompt_index, texts):
        ev = evaluate(records[i].meta["instructions"], t)
        for k in out:
            out[k].append(ev[k])
    return out


@torch.no_grad()
def sequence_logprob(model, prompt_ids, response_ids, pad_id: int, batch: int = 32) -> list[float]:
    """Summed log-prob of each response (its stop token included) after its prompt, teacher-forced."""
    from align_decode.training.arm import response_logprobs

    out = []
    for s in range(0, len(response_ids), batch):
        seqs = [(list(p) + list(r), len(p)) for p, r in zip(prompt_ids[s:s + batch], response_ids[s:s + batch])]
        out += response_logprobs(model, seqs, pad_id).tolist()
    return out


def draw_pool(policy, records, prompt_ids, n: int, max_new_tokens: int, family: str, seed: int, batch_prompts: int):
    """n plain samples (T = 1, no truncation) per prompt: ids and texts, per prompt."""
    from align_decode.commandline.run import prompt_seed
    from align_decode.decoding import GenerationSettings, PromptBatch, left_pad
    from align_decode.decoding.candidates import completion_ids, sample_candidates
    from align_decode.decoding.strategy import Sample

    tok = policy.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    ids_out, texts_out = [], []
    per = max(1, min(batch_prompts, 512 // n)) if n <= 512 else 1
    for start in range(0, len(records), per):
        index = range(start, min(start + per, len(records)))
        ids, mask = left_pad([prompt_ids[i] for i in index], pad, device=policy.device)
        batch = PromptBatch(ids, mask, [records[i].text for i in index])
        seeds = torch.tensor([prompt_seed(seed, f"{family}/{records[i].key}") for i in index], dtype=torch.long)
        settings = GenerationSettings.resolve(policy.model, tok, None, 0, max_new_tokens=max_new_tokens,
                                              do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                                              num_return_sequences=1, seed=seeds)
        drawn = sample_candidates(Sample(), policy, batch, settings, n, max_rows=64)
        resp = completion_ids(drawn)
        texts = tok.batch_decode(resp, skip_special_tokens=True)
        for b in range(len(index)):
            ids_out.append(resp[b * n:(b + 1) * n])
            texts_out.append(texts[b * n:(b + 1) * n])
    return ids_out, texts_out


def arm_proxy(arm_model, policy, prompt_ids, pool_ids) -> list[list[float]]:
    """The ARM's learned reward of every pool sample: log pi_ARM(y|x) - log p(y|x)."""
    tok = policy.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    out = []
    for p, ids in zip(prompt_ids, pool_ids):
        a = sequence_logprob(arm_model, [p] * len(ids), ids, pad)
        b = sequence_logprob(policy.model, [p] * len(ids), ids, pad)
        out.append([x - y for x, y in zip(a, b)])
    return out


def disagreement(proxy, judge) -> float:
    """How badly the proxy ranks one prompt's pool for the judge: 1 - Pearson correlation, for prompts
    the judge sometimes passes and sometimes fails (others get -inf: nothing to over-optimise)."""
    r, j = np.asarray(proxy, dtype=np.float64), np.asarray(judge, dtype=np.float64)
    if j.std() == 0 or r.std() == 0:
        return -np.inf
    return float(1.0 - np.corrcoef(r, j)[0, 1])


def main(argv=None) -> int:
    args = _parse(argv)
    torch.set_num_threads(args.threads)
    from align_decode.decoding import Policy
    from align_decode.models import cache_dir, load_model

    from .scales import VERIFIABLE_SCALES

    scale = VERIFIABLE_SCALES[args.scale]
    work = args.work or cache_dir().parent / "quality-benchmark" / f"verifiable-{scale.name}"
    out = args.out or (HERE / "results" / "verifiable" if scale.name == "full" else work / "results")
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    if args.redraw:
        saved = json.loads((out / "results.json").read_text())
        print(f"rewrote {publish(saved, out)} and its plots", file=sys.stderr)
        return 0
    started = time.perf_counter()

    def note(message: str) -> None:
        print(f"[{time.perf_counter() - started:6.0f} s] {message}", file=sys.stderr, flush=True)

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    model, tok = load_model()
    policy = Policy(model, tok)
    note(f"scale {scale.name}; policy {model.config._name_or_path}; {args.threads} thread(s)")
    timings: dict[str, float] = {}
    results: dict = {}
    tick = time.perf_counter()
    results["ifeval"] = run_ifeval(scale, policy, work, args.seed, note, timings)
    if not args.skip_toxicity:
        from .toxicity import run_toxicity_study

        tick = time.perf_counter()
        results["toxicity"] = run_toxicity_study(scale, policy, work, args.seed, note)
        timings["non-toxicity ARM study"] = time.perf_counter() - tick
    total = time.perf_counter() - started
    command = "python -m benchmarks.quality.verifiable " + ("--full" if scale.name == "full" else f"--scale {scale.name}")
    results["run"] = {"scale": asdict(scale), "command": command, "seconds": round(total, 1),
                      "timings": {k: round(v, 1) for k, v in timings.items()}, "threads": args.threads,
                      "seed": args.seed, "torch": torch.__version__,
                      "machine": f"{platform.machine()}, {os.cpu_count()} CPU(s), no GPU used"}
    (out / "results.json").write_text(json.dumps(results, indent=1))
    report = publish(results, out)
    note(f"done in {total:.0f} s; results in {out}, report {report}")
    return 0


def run_ifeval(scale, policy, work: Path, seed: int, note, timings: dict) -> dict:
    from align_decode import GenARM, Sample
    from align_decode.commandline.prompts_file import read_prompts
    from align_decode.commandline.run import encode_prompt, prompt_seed
    from align_decode.decoding.guides import ARM
    from align_decode.models import load_model
    from align_decode.rewards.instructions import InstructionReward
    from align_decode.training.preferences import PreferenceSettings, sample_preferences

    from . import selection
    from .evaluate import complete, summary_row
    from .generate import EvalContext, run_qalign, run_token_method
    from .guides import _train_arm
    from .suite import _checkpoints
    from .tasks import spread

    tok = policy.tokenizer
    every = read_prompts(TASK_FILE)
    train = spread([r for r in every if r.meta["split"] == "train"], scale.train_prompts)
    test = spread([r for r in every if r.meta["split"] == "test"], scale.test_prompts)
    table = instruction_table(every)
    judge = InstructionReward(table, "strict")
    soft = InstructionReward(table, "soft")
    partial = InstructionReward(table, "partial")
    rng = np.random.default_rng(seed)
    res: dict = {"train_prompts": len(train), "test_prompts": len(test)}

    # (1) The ARM, from verifier-labelled pairs: K samples per train prompt scored by the verifier
    # (partial + strict, so "all pass" beats "most pass" beats "fewer"), best against worst.
    tick = time.perf_counter()
    label = partial + judge
    train_ids = [encode_prompt(r, tok, True, str(TASK_FILE)) for r in train]
    settings = PreferenceSettings(samples=scale.train_samples, max_new_tokens=scale.max_new_tokens,
                                  batch_size=scale.batch_prompts, seed=seed)
    seeds = [prompt_seed(seed, f"train/{r.key}") for r in train]
    pairs, train_strict = [], []
    with torch.no_grad():
        for s in sample_preferences(policy, train_ids, [r.text for r in train], seeds, label, settings):
            rec = train[s.index]
            train_strict += judge.score([rec.text] * len(s.texts), s.texts).tolist()
            line = s.line(rec.id, rec.text)
            if line is not None:
                pairs.append(line)
    note(f"ifeval: {len(train) * scale.train_samples} train samples (judge pass rate {np.mean(train_strict):.3f}), "
         f"{len(pairs)} verifier-labelled pairs")
    arm_dir, arm_report = _train_arm(_Task(), scale, policy, pairs, work / "ifeval_arm", seed, note)
    arm_report.update(pairs=len(pairs), train_samples=len(train_strict), train_judge=float(np.mean(train_strict)),
                      sampling_seconds=round(time.perf_counter() - tick - arm_report["seconds"], 1))
    res["arm"] = arm_report
    timings["ifeval ARM"] = time.perf_counter() - tick
    arm_model, _ = load_model(arm_dir)
    arm_model.eval()

    # (2) One pool per held-out prompt: best-of-N exactly, votes by Monte Carlo.
    tick = time.perf_counter()
    test_ids = [encode_prompt(r, tok, True, str(TASK_FILE)) for r in test]
    with torch.no_grad():
        pool_ids, pool_texts = draw_pool(policy, test, test_ids, scale.pool, scale.max_new_tokens, "pool", seed,
                                         scale.batch_prompts)
        pool_arm = arm_proxy(arm_model, policy, test_ids, pool_ids)
    pool_scores = [score_texts(test, [i] * len(t), t) for i, t in enumerate(pool_texts)]
    pool_len = [float(np.mean([len(x) for x in ids])) for ids in pool_ids]
    timings["ifeval pool"] = time.perf_counter() - tick
    note(f"ifeval: pool of {scale.pool} per held-out prompt in {timings['ifeval pool']:.0f} s; judge pass rate "
         f"{np.mean([np.mean(s['strict']) for s in pool_scores]):.3f}")
    s_count = scale.samples
    prompt_len = float(np.mean([len(p) for p in test_ids]))
    ns = [n for n in selection.log_spaced(scale.pool)]
    rows = []
    for proxy_name, proxies in (("soft", [s["soft"] for s in pool_scores]), ("arm", pool_arm)):
        per = np.array([np.stack(selection.best_of_n_curve(r, s["strict"], ns)
                                 + selection.best_of_n_curve(r, s["soft"], ns)
                                 + selection.best_of_n_curve(r, s["partial"], ns))
                        for r, s in zip(proxies, pool_scores)])  # [P, 6, len(ns)]: r, strict, r, soft, r, partial
        for k, n in enumerate(ns):
            rows.append(_pool_row("best_of_n" if proxy_name == "soft" else "best_of_n_arm",
                                  f"best-of-{n} ({proxy_name} proxy)", n, per[:, 3, k], per[:, 1, k], per[:, 5, k],
                                  prompt_len / s_count + n * float(np.mean(pool_len)), n))
    votes = [selection.vote_curves(t, s["soft"], s["strict"], ns, scale.vote_beta, scale.vote_draws, rng)
             for t, s in zip(pool_texts, pool_scores)]
    for key, family in (("majority", "majority"), ("weighted", "weighted_majority")):
        for k, n in enumerate(ns):
            judge_v = np.array([v[f"{key}_judge"][k] for v in votes])
            proxy_v = np.array([v[f"{key}_proxy"][k] for v in votes])
            rows.append(_pool_row(family, f"{family.replace('_', ' ')} vote N={n}", n, proxy_v, judge_v, None,
                                  prompt_len / s_count + n * float(np.mean(pool_len)), n))
    res["distinct_share"] = float(np.mean([selection.distinct_share(t) for t in pool_texts]))
    res["pool"] = scale.pool
    res["pool_judge_by_instruction"] = _by_instruction(test, pool_texts)

    # (3) Token-level methods and QAlign on the held-out prompts, S responses each.
    ctx = EvalContext(policy, test, True, str(TASK_FILE), s_count, scale.max_new_tokens, scale.batch_prompts, seed)
    scorers = {"soft": soft, "strict": judge, "partial": partial}
    pool_r = {i: s["soft"] for i, s in enumerate(pool_scores)}

    def record(o, plain=None):
        complete(ctx, o, scorers)
        row = summary_row(o, "soft", plain, pool_r)
        row["reward_name"] = "soft"
        rows.append(row)
        note(f"ifeval: {o.label}: soft {row['reward']:.3f}, judge {row['strict_mean']:.3f}, KL {row['kl']:.2f}, "
             f"{o.seconds:.0f} s")
        return o

    tick = time.perf_counter()
    plain = record(run_token_method(ctx, Sample(), "sample", "plain sampling", None))
    arm = ARM(arm_model, tok, name="verifier ARM")
    for w in scale.genarm_weights:
        record(run_token_method(ctx, GenARM(arm, weights=[w]), "genarm_trained", f"GenARM trained ARM w={w}", w,
                                guide_cost=1.0), plain)
    untrained = ARM(policy.model, tok, name="untrained ARM (the policy)")
    w0 = scale.genarm_weights[-1]
    record(run_token_method(ctx, GenARM(untrained, weights=[w0]), "genarm_untrained", f"GenARM untrained ARM w={w0}",
                            w0, guide_cost=1.0), plain)
    for o in run_qalign(ctx, soft, scale.qalign_beta, scale.qalign_steps, _checkpoints(scale.qalign_steps)):
        record(o, plain)
    timings["ifeval methods"] = time.perf_counter() - tick
    res["rows"] = rows

    # (4) Over-optimisation on the prompts where the soft proxy and the judge disagree most.
    tick = time.perf_counter()
    dis = [disagreement(s["soft"], s["strict"]) for s in pool_scores]
    # Prompts the judge always passes or always fails come last (only a tiny run needs them).
    order = [int(i) for i in np.argsort(dis, kind="stable")[::-1]][:scale.overopt_prompts]
    chosen = [test[i] for i in order]
    chosen_ids = [test_ids[i] for i in order]
    with torch.no_grad():
        big_ids, big_texts = draw_pool(policy, chosen, chosen_ids, scale.overopt_pool, scale.max_new_tokens,
                                       "overopt", seed, scale.batch_prompts)
        big_arm = arm_proxy(arm_model, policy, chosen_ids, big_ids)
    big_scores = [score_texts(chosen, [i] * len(t), t) for i, t in enumerate(big_texts)]
    big_ns = [n for n in selection.log_spaced(scale.overopt_pool) if n <= scale.overopt_max_n]
    over = {"prompts": [{"id": r.id, "prompt": r.text, "instructions": r.meta["instructions"],
                         "disagreement_on_first_pool": dis[i] if np.isfinite(dis[i]) else None} for r, i in zip(chosen, order)],
            "ns": big_ns, "pool": scale.overopt_pool,
            "pool_judge": [float(np.mean(s["strict"])) for s in big_scores],
            "pool_proxy_judge_corr": [1 - disagreement(s["soft"], s["strict"]) if np.isfinite(
                disagreement(s["soft"], s["strict"])) else None for s in big_scores]}
    for proxy_name, proxies in (("soft", [s["soft"] for s in big_scores]), ("arm", big_arm)):
        boot = selection.bootstrap_best_of_n(list(zip(proxies, [s["strict"] for s in big_scores])), big_ns,
                                             scale.boot_reps, rng)
        best_k = int(np.argmax(boot["judge"]))
        # Does the judge fall after its peak? The drop from the peak to the largest N, with the bootstrap
        # share of replicates in which the largest N is below that replicate's value at the peak N.
        drop = float(boot["judge"][best_k] - boot["judge"][-1])
        below = float(np.mean(boot["boot_judge"][:, -1] < boot["boot_judge"][:, best_k]))
        soft_curve = [selection.best_of_n_curve(r, s["soft"], big_ns)[1] for r, s in zip(proxies, big_scores)]
        over[proxy_name] = {
            "proxy": boot["proxy"].tolist(), "proxy_lo": boot["proxy_lo"].tolist(), "proxy_hi": boot["proxy_hi"].tolist(),
            "judge": boot["judge"].tolist(), "judge_lo": boot["judge_lo"].tolist(), "judge_hi": boot["judge_hi"].tolist(),
            "soft": np.mean(soft_curve, 0).tolist(),
            "per_prompt_judge": boot["per_prompt_judge"].tolist(),
            "peak_n": big_ns[best_k], "drop_from_peak": drop, "share_boot_below_peak": below,
            "top_samples": _top_samples(proxies, big_scores, big_texts, chosen),
        }
        note(f"over-optimisation, {proxy_name} proxy: judge " + ", ".join(
            f"N={n}: {j:.3f}" for n, j in zip(big_ns, boot["judge"])))
    # Long QAlign chains on the same prompts (soft proxy).
    qctx = EvalContext(policy, chosen, True, str(TASK_FILE), scale.deep_chains, scale.max_new_tokens,
                       scale.batch_prompts, seed)
    qrows = []
    for o in run_qalign(qctx, soft, scale.qalign_beta, scale.deep_steps, _checkpoints(scale.deep_steps)):
        complete(qctx, o, scorers)
        per_prompt_j = [float(np.mean([v for i, v in zip(o.prompt_index, o.extra["rewards"]["strict"]) if i == p]))
                        for p in range(len(chosen))]
        mean, lo, hi = selection.mean_ci(per_prompt_j, scale.boot_reps, rng)
        pm, plo, phi = selection.mean_ci([float(np.mean([v for i, v in zip(o.prompt_index, o.extra["rewards"]["soft"])
                                                         if i == p])) for p in range(len(chosen))],
                                         scale.boot_reps, rng)
        qrows.append({"steps": o.extra["steps"], "compute": float(np.mean(o.compute)), "judge": mean,
                      "judge_lo": lo, "judge_hi": hi, "proxy": pm, "proxy_lo": plo, "proxy_hi": phi,
                      "acceptance": float(np.mean(o.extra["acceptance"])), "chains": len(o.ids)})
    over["qalign"] = qrows
    over["qalign_beta"] = scale.qalign_beta
    over["mean_len"] = float(np.mean([np.mean([len(x) for x in ids]) for ids in big_ids]))
    over["bon_compute"] = [float(np.mean([len(p) for p in chosen_ids])) + n * over["mean_len"] for n in big_ns]
    res["overopt"] = over
    timings["over-optimisation"] = time.perf_counter() - tick
    return res


def _pool_row(family, label, n, soft, strict, partial, compute, calls) -> dict:
    from .metrics import best_of_n_kl, mean_se

    row = {"family": family, "label": label, "param": n, "responses": len(soft), "reward_name": "soft"}
    row["reward"], row["reward_se"] = mean_se(soft)
    row["strict_mean"], row["strict_se"] = mean_se(strict)
    if partial is not None:
        row["partial_mean"], row["partial_se"] = mean_se(partial)
    row["kl"] = best_of_n_kl(int(n)) if family.startswith("best_of_n") else None
    row["kl_kind"] = "bound"
    row["compute"] = compute
    row["reward_calls"] = float(calls)
    return row


def _by_instruction(records, pool_texts) -> dict:
    """The pool's strict pass rate per instruction id (how hard each instruction is for the policy)."""
    from align_decode.rewards.instructions import check_instruction

    hits: dict[str, list[float]] = {}
    for rec, texts in zip(records, pool_texts):
        for ins in rec.meta["instructions"]:
            hits.setdefault(ins["id"], []).extend(float(check_instruction(ins, t)) for t in texts)
    return {k: {"pass_rate": float(np.mean(v)), "samples": len(v)} for k, v in sorted(hits.items())}


def _top_samples(proxies, scores, texts, records, k: int = 3) -> list[dict]:
    """The k samples with the highest proxy of each prompt: what best-of-large-N ends up choosing."""
    out = []
    for r, s, t, rec in zip(proxies, scores, texts, records):
        for i in np.argsort(np.asarray(r))[::-1][:k]:
            out.append({"id": rec.id, "proxy": float(r[i]), "judge": s["strict"][i], "text": t[i]})
    return out


def publish(results: dict, out: Path) -> Path:
    from . import plots
    from .report import splice_verifiable, write_verifiable

    figures = {}
    ife = results["ifeval"]
    figures["verifiable_vs_compute"] = plots.verifiable_vs_compute(ife["rows"], out / "verifiable_vs_compute.png")
    figures["verifiable_overopt"] = plots.verifiable_overopt(ife["overopt"], out / "verifiable_overopt.png")
    names = {k: v.name for k, v in figures.items()}
    path = write_verifiable(out / "RESULTS_verifiable.md", results, names, figure_dir=out)
    if results["run"]["scale"]["name"] == "full" and out.resolve() == (HERE / "results" / "verifiable").resolve():
        splice_verifiable(HERE.parent / "RESULTS.md", results, names, figure_dir=out)
    return path


if __name__ == "__main__":
    raise SystemExit(main())
