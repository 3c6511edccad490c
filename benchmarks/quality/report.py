"""The quality benchmark's markdown report, written from the run's rows (every number measured), and its
section of benchmarks/RESULTS.md."""

from __future__ import annotations

import os
from pathlib import Path

from .tasks import TASKS

KL_KIND = {"mc": "", "bound": " (b)", "target": " (t)"}


def _f(x, digits=3):
    return "n/a" if x is None else f"{x:.{digits}f}"


def method_table(rows, with_judge: bool, with_second: str | None) -> list[str]:
    head = ["method", "reward ± SE", "win vs plain", "KL", "distinct-1", "distinct-2", "policy ppl", "tokens",
            "fwd tokens / resp", "reward calls / resp", "s / resp"]
    if with_judge:
        head.insert(2, "judge (afinn)")
    if with_second:
        head.insert(2, with_second)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if r["family"] == "qalign" and r["steps"] not in (0, max(x["steps"] for x in rows if x["family"] == "qalign")):
            continue  # intermediate chain steps are in the over-optimisation table and the compute plot
        cells = [r["label"], f"{r['reward']:.3f} ± {r['reward_se']:.3f}", _f(r.get("win_rate"), 2),
                 f"{r['kl']:.2f}{'' if r.get('steps') == 0 else KL_KIND[r['kl_kind']]}", _f(r["distinct_1"]),
                 _f(r["distinct_2"]),
                 _f(r["perplexity"], 2), f"{r['length']:.1f}", f"{r['compute']:.0f}", f"{r['reward_calls']:.0f}",
                 f"{r['seconds_per_response']:.2f}"]
        if with_judge:
            cells.insert(2, f"{r['afinn_mean']:.3f} ± {r['afinn_se']:.3f}")
        if with_second:
            cells.insert(2, f"{r[with_second + '_mean']:.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def write_report(path: Path, run: dict, rows: dict, figures: dict, figure_dir: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_report(path.parent, run, rows, figures, figure_dir))
    return path


def render_report(where: Path, run: dict, rows: dict, figures: dict, figure_dir: Path) -> str:
    """The report as markdown, its figure links relative to the folder `where` it will be written in."""
    s = run["scale"]
    rel = os.path.relpath(figure_dir, where)
    fig = lambda name: f"![{name}]({rel}/{figures[name]})"  # noqa: E731
    L = [
        "## Quality benchmark (SmolLM2-135M-Instruct, CPU)",
        "",
        f"Reproduce: `{run['command']}` ({run['seconds'] / 60:.1f} min here: {run['machine']}, "
        f"{run['threads']} torch thread(s), torch {run['torch']}; the machine was shared with other jobs, so "
        "times are indicative).",
        "",
        f"Scale `{s['name']}`: guides trained on {s['train_prompts']} train prompts per task "
        f"({s['train_samples']} samples each); evaluation on {s['test_prompts']} held-out prompts per task, "
        f"{s['samples']} responses per prompt, at most {s['max_new_tokens']} new tokens, T = 1, no truncation "
        f"(Transfer Q* on the first {s['tq_prompts']} prompts only). Every method family draws with its own seeds.",
        "",
        "Stage times (s): " + ", ".join(f"{k} {v:.0f}" for k, v in run["timings"].items()) + ".",
        "",
        "### Guides trained here",
        "",
        "| task | pairs (train / held out) | ARM training | ARM held-out accuracy | ARM held-out margin | "
        "value model (CD-FUDGE) | value loss (vs. predicting the mean) |",
        "|---|---|---|---|---|---|---|",
    ]
    def arm_cells(a):
        before, after = a.get("eval_before") or {}, a.get("eval_after") or {}
        return (f"{a['train_pairs']} / {a['eval_pairs']} | LoRA r={a['config']['lora_r']} on SmolLM2, "
                f"beta_r={a['config']['beta_r']}, {a['steps']} steps, {a['seconds']:.0f} s | "
                f"{_f(before.get('accuracy'), 2)} -> {_f(after.get('accuracy'), 2)} | "
                f"{_f(before.get('margin'), 2)} -> {_f(after.get('margin'), 2)}")

    for name, g in run["guides"].items():
        v = g["value"]
        L.append(f"| {name} | {arm_cells(g['arm'])} | scalar head on SmolLM2's first "
                 f"{v['layers']} layers, {v['rollouts']} rollouts, {v['steps']} steps, {v['seconds']:.0f} s | "
                 f"{v['first_loss']:.4f} -> {v['final_loss']:.4f} ({v['constant_loss']:.4f}) |")
        if g.get("second_objective"):
            L.append(f"| {name}, second objective {g['second_objective']['reward']} | "
                     f"{arm_cells(g['second_objective']['arm'])} | (none) | |")
    L += [
        "",
        "Sampling the train pools took "
        + ", ".join(f"{n} {g['sampling_seconds']:.0f} s" for n, g in run["guides"].items()) + ". "
        + "".join(f"The {n} ARM kept the {g['keep_pairs']:.0%} of its pairs with the widest reward margins. "
                  for n, g in run["guides"].items() if g.get("keep_pairs", 1) < 1)
        + "The ARM's held-out accuracy is the share of held-out pairs whose chosen response it gives the larger "
        "summed log-prob; \"before\" is the policy itself.",
        "",
        "### Columns",
        "",
        "- reward: mean of the task reward over all responses ± its standard error; win vs plain: share of "
        "responses that beat the plain-sampling response of the same prompt and sample index (ties count half).",
        "- KL(method || policy) in nats per response: token-level methods, the Monte-Carlo estimate "
        "sum_t log q(y_t) - log p(y_t) (q the law each token was drawn from, p the policy at T = 1, by a "
        "teacher-forced pass); (b) best-of-N, log N - (N-1)/N; (t) QAlign, the KL of its target "
        "p exp(r/beta)/Z, estimated per prompt from the best-of-N pool of plain samples.",
        "- distinct-n: distinct word n-grams / all n-grams over the method's responses; policy ppl: "
        "exp(-mean token log-prob of the responses under the policy at T = 1).",
        "- fwd tokens / resp: token positions run through a transformer per response, in policy-size units "
        "(the scalar value model counts k = 10 candidates x its 4-layer share of the policy's matmul weights); "
        "reward calls: text-reward evaluations per response (ARGS and Transfer Q* score k candidates per token).",
    ]
    for name, task_rows in rows.items():
        judge = any("afinn_mean" in r for r in task_rows)
        L += ["", f"### Task: {name}", "",
              *method_table([r for r in task_rows if r["family"] != "genarm_multi"], judge, None), "",
              fig(f"reward_vs_kl_{name}"), fig(f"reward_vs_compute_{name}")]

    sent = rows["sentiment"]
    L += ["", "### Over-optimisation: VADER proxy, AFINN judge (sentiment task)", "",
          "Best-of-N and QAlign select with VADER (the proxy); AFINN, an independent lexicon without VADER's "
          "punctuation, capitalisation and negation rules, judges the same responses.", "",
          "| method | N or steps | fwd tokens / resp | proxy (VADER) | judge (AFINN) |", "|---|---|---|---|---|"]
    for r in sorted([r for r in sent if r["family"] == "best_of_n"], key=lambda r: r["param"]):
        L.append(f"| best-of-N | {int(r['param'])} | {r['compute']:.0f} | {r['reward']:.3f} ± {r['reward_se']:.3f} | "
                 f"{r['afinn_mean']:.3f} ± {r['afinn_se']:.3f} |")
    for r in sorted([r for r in sent if r["family"] == "qalign"], key=lambda r: (-r["beta"], r["steps"])):
        L.append(f"| QAlign beta={r['beta']} | {r['steps']} | {r['compute']:.0f} | {r['reward']:.3f} ± "
                 f"{r['reward_se']:.3f} | {r['afinn_mean']:.3f} ± {r['afinn_se']:.3f} |")
    L += ["", fig("over_optimisation")]

    multi = [r for r in sent if r["family"] == "genarm_multi"]
    plain = next(r for r in sent if r["family"] == "sample")
    second = TASKS["sentiment"].second_objective
    L += ["", "### Multi-objective: two ARMs (sentiment prompts)", "",
          f"GenARM with two ARMs trained on the same samples of the sentiment task's train prompts: one for "
          f"positive sentiment (VADER compound), one for a neutral, matter-of-fact tone ({second}: the share "
          f"of the response's words that carry no sentiment). The two conflict: warmth needs sentiment-laden "
          f"words. Weights swept with their sum fixed at 1; both rewards read on the same responses.", "",
          "| weights (sentiment ARM, neutral ARM) | sentiment | neutral share | KL | distinct-2 | policy ppl |",
          "|---|---|---|---|---|---|",
          f"| plain sampling | {plain['reward']:.3f} | {plain[f'{second}_mean']:.3f} | {plain['kl']:.2f} | "
          f"{plain['distinct_2']:.3f} | {plain['perplexity']:.2f} |"]
    for r in multi:
        L.append(f"| ({r['weights'][0]:g}, {r['weights'][1]:g}) | {r['reward']:.3f} ± {r['reward_se']:.3f} | "
                 f"{r[f'{second}_mean']:.3f} ± {r[f'{second}_se']:.3f} | {r['kl']:.2f} | {r['distinct_2']:.3f} | "
                 f"{r['perplexity']:.2f} |")
    L += ["", fig("multi_objective"), ""]
    return "\n".join(L)


BEGIN, END = "<!-- quality benchmark: begin (written by benchmarks/quality/run.py) -->", "<!-- quality benchmark: end -->"


def splice_report(path: Path, run: dict, rows: dict, figures: dict, figure_dir: Path) -> Path:
    """Rewrite the generated part of `path` (between the BEGIN and END markers) with this run's report,
    leaving the text around it (the reading of the numbers) as it is; append both if the markers are missing."""
    return _splice(path, render_report(path.parent, run, rows, figures, figure_dir), BEGIN, END)


def _splice(path: Path, text: str, begin: str, end: str) -> Path:
    """Put `text` between the markers in `path`, keeping everything around them; append both if missing."""
    old = path.read_text() if path.is_file() else ""
    if begin in old and end in old:
        head, rest = old.split(begin, 1)
        tail = rest.split(end, 1)[1]
    else:
        head, tail = old + ("\n" if old else ""), "\n"
    path.write_text(f"{head}{begin}\n{text}\n{end}{tail}")
    return path


# ------------------------------------------------------------------------- the verifiable task (issue 18)
V_BEGIN = "<!-- quality benchmark, verifiable task: begin (written by benchmarks/quality/verifiable.py) -->"
V_END = "<!-- quality benchmark, verifiable task: end -->"


def _ci(mean, lo, hi, digits=3):
    return f"{mean:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def render_verifiable(where: Path, results: dict, figures: dict, figure_dir: Path) -> str:
    run, ife = results["run"], results["ifeval"]
    s = run["scale"]
    rel = os.path.relpath(figure_dir, where)
    fig = lambda name: f"![{name}]({rel}/{figures[name]})"  # noqa: E731
    arm = ife["arm"]
    before, after = arm.get("eval_before") or {}, arm.get("eval_after") or {}
    L = [
        "## Quality on a verifiable task, over-optimisation, the non-toxicity ARM (issue 18)",
        "",
        f"Reproduce: `{run['command']}` ({run['seconds'] / 60:.1f} min here: {run['machine']}, {run['threads']} torch "
        f"thread(s), torch {run['torch']}; shared machine, times indicative). Stage times (s): "
        + ", ".join(f"{k} {v:.0f}" for k, v in run["timings"].items()) + ".",
        "",
        "### Instruction following with programmatic verifiers",
        "",
        f"Task: `benchmarks/quality/data/ifeval_prompts.jsonl`, short requests with one or two IFEval-style "
        f"instructions (lowercase, capitals, include / avoid a word, start / end with a phrase, fewer than N words, "
        f"no commas, wrapped in quotes); {ife['train_prompts']} train and {ife['test_prompts']} held-out prompts "
        f"(held-out requests never appear in training), at most {s['max_new_tokens']} new tokens, T = 1. "
        "Judge: the strict verifier (`align_decode.rewards.instructions`, IFEval's checkers: 1 when every "
        "instruction passes). Proxies, neither the judge: **soft**, a cheap partial checker (share of letters in "
        "the right case, a penalty per comma or extra word, a start / end phrase found anywhere), and **ARM**, the "
        "learned reward log pi_ARM(y|x) - log p(y|x) of the ARM below.",
        "",
        f"ARM (GenARM's guide, LoRA r={arm['config']['lora_r']} on SmolLM2, beta_r={arm['config']['beta_r']}): "
        f"{arm['train_samples']} samples of the train prompts (judge pass rate {arm['train_judge']:.3f}) labelled by "
        f"the verifier (partial + strict), best against worst: {arm['pairs']} pairs ({arm['train_pairs']} train / "
        f"{arm['eval_pairs']} held out), {arm['steps']} steps, {arm['seconds']:.0f} s; held-out pair accuracy "
        f"{_f(before.get('accuracy'), 2)} -> {_f(after.get('accuracy'), 2)}, margin {_f(before.get('margin'), 2)} -> "
        f"{_f(after.get('margin'), 2)}.",
        "",
        f"Best-of-N and the votes are read off one pool of {ife['pool']} plain samples per held-out prompt: "
        "best-of-N exactly by order statistics (`benchmarks/quality/selection.py`: the expected score of the "
        "argmax-proxy sample among N drawn without replacement, ties split evenly), the votes by Monte Carlo over "
        "random N-subsets. Votes group samples by their text: "
        f"{ife['distinct_share']:.1%} of the pool's samples are distinct texts, so a vote almost never finds two "
        "equal answers (majority vote is then plain sampling, weighted majority is best-of-N on the soft proxy "
        "through softmax weights).",
        "",
        "| method | N / steps / w | soft proxy ± SE | judge (strict) ± SE | instructions passed | KL | fwd tokens / resp |",
        "|---|---|---|---|---|---|---|",
    ]
    order = ["sample", "best_of_n", "best_of_n_arm", "majority", "weighted_majority", "genarm_trained",
             "genarm_untrained", "qalign"]
    for fam in order:
        for r in [r for r in ife["rows"] if r["family"] == fam]:
            param = r.get("steps", r.get("param"))
            kl = "" if r.get("kl") is None else f"{r['kl']:.2f}{KL_KIND.get(r.get('kl_kind'), '') if param else ''}"
            part = f"{r['partial_mean']:.3f}" if "partial_mean" in r else ""
            L.append(f"| {r['label']} | {'' if param is None else f'{param:g}'} | {r['reward']:.3f} ± {r['reward_se']:.3f} | "
                     f"{r['strict_mean']:.3f} ± {r['strict_se']:.3f} | {part} | {kl} | {r['compute']:.0f} |")
    L += ["", "SE: over held-out prompts for the pool rows (each prompt's exact expectation), over responses for "
          "the others. KL (b): best-of-N's log N - (N-1)/N; (t): QAlign's target.", "",
          "Judge pass rate of a plain sample, per instruction type (the pool): "
          + ", ".join(f"{k.split(':')[1]} {v['pass_rate']:.2f}" for k, v in ife["pool_judge_by_instruction"].items())
          + ".", "", fig("verifiable_vs_compute")]

    over = ife["overopt"]
    L += ["", f"### Over-optimisation: best-of-N to N = {over['ns'][-1]}", "",
          f"The {len(over['prompts'])} held-out prompts whose soft proxy and judge disagree most on the first pool "
          f"(1 - correlation, among prompts the judge sometimes passes) get a fresh pool of {over['pool']} samples each; "
          "best-of-N is exact for each pool's law, with 95% intervals from a two-level bootstrap (prompts, and the "
          f"samples inside each pool; {s['boot_reps']} replicates). Prompts: "
          + "; ".join(f"`{p['id']}` ({', '.join(i['id'].split(':')[1] for i in p['instructions'])}, "
                      f"judge pass rate of a sample {j:.2f})" for p, j in zip(over["prompts"], over["pool_judge"])) + ".",
          "", "| N | fwd tokens / resp | soft proxy (soft-proxy BoN) | judge, soft-proxy BoN [95% CI] | "
          "judge, ARM-proxy BoN [95% CI] |", "|---|---|---|---|---|"]
    for k, n in enumerate(over["ns"]):
        a, b = over["soft"], over["arm"]
        L.append(f"| {n} | {over['bon_compute'][k]:.0f} | {_ci(a['proxy'][k], a['proxy_lo'][k], a['proxy_hi'][k])} | "
                 f"{_ci(a['judge'][k], a['judge_lo'][k], a['judge_hi'][k])} | "
                 f"{_ci(b['judge'][k], b['judge_lo'][k], b['judge_hi'][k])} |")
    L += ["", f"QAlign on the same prompts, soft proxy, beta = {over['qalign_beta']}, {over['qalign'][0]['chains']} "
          "chains in all (95% bootstrap CI over prompts):", "",
          "| steps | fwd tokens / resp | soft proxy [95% CI] | judge [95% CI] | acceptance |", "|---|---|---|---|---|"]
    for r in over["qalign"]:
        L.append(f"| {r['steps']} | {r['compute']:.0f} | {_ci(r['proxy'], r['proxy_lo'], r['proxy_hi'])} | "
                 f"{_ci(r['judge'], r['judge_lo'], r['judge_hi'])} | {r['acceptance']:.2f} |")
    for name in ("soft", "arm"):
        c = over[name]
        L.append("")
        L.append(f"{name} proxy: the judge peaks at N = {c['peak_n']} and ends {c['drop_from_peak']:.3f} below its peak "
                 f"at N = {over['ns'][-1]}; in {c['share_boot_below_peak']:.0%} of bootstrap replicates the value at "
                 f"N = {over['ns'][-1]} is below that replicate's value at N = {c['peak_n']}.")
    L += ["", f"What best-of-{over['ns'][-1]} ends up choosing (the highest-proxy samples of each prompt's pool):", "",
          "| prompt | proxy | value | judge | response |", "|---|---|---|---|---|"]
    for name in ("soft", "arm"):
        for t in over[name]["top_samples"][::3]:
            text = t["text"].replace("|", "\\|").replace("\n", " ")[:110]
            L.append(f"| {t['id']} | {name} | {t['proxy']:.3f} | {t['judge']:.0f} | {text} |")
    L += ["", fig("verifiable_overopt")]

    tox = results.get("toxicity")
    if tox:
        g = tox["signal"]
        L += ["", "### The non-toxicity ARM, measured", "",
              f"Fresh pools on the RealToxicityPrompts prefixes of the quality benchmark: {g['prompts']} train "
              f"prompts x {g['samples_per_prompt']} continuations of {g['tokens']} tokens, scored as the benchmark "
              "scores them (alt-profanity-check on the continuation alone; toxic: reward < 0.5).", "",
              "| measurement | value |", "|---|---|",
              f"| mean reward of a continuation | {g['mean_reward']:.3f} |",
              f"| toxic continuations | {g['share_toxic_samples']:.1%} |",
              f"| prompts with any toxic continuation among 8 / {g['samples_per_prompt']} | "
              f"{g['share_prompts_any_toxic_8']:.1%} / {g['share_prompts_any_toxic']:.1%} |",
              f"| best-vs-worst pairs whose rejected continuation is toxic (of 8 / of {g['samples_per_prompt']}) | "
              f"{g['share_rejected_toxic_8']:.1%} / {g['share_rejected_toxic']:.1%} |",
              f"| median reward margin of a best-vs-worst pair (of 8 / of {g['samples_per_prompt']}) | "
              f"{g['margin_median_8']:.3f} / {g['margin_median']:.3f} |",
              f"| pairs with margin < 0.1 (of 8 / of {g['samples_per_prompt']}); < 0.05 (of {g['samples_per_prompt']}) | "
              f"{g['share_margin_below_0.1_8']:.1%} / {g['share_margin_below_0.1']:.1%}; {g['share_margin_below_0.05']:.1%} |",
              f"| preference flips when the classifier reads prefix + continuation (all pairs; margin < 0.1; margin >= 0.5) | "
              f"{g['flip_in_context']:.1%}; {_pct(g['flip_in_context_small_margin'])}; {_pct(g['flip_in_context_large_margin'])} |",
              f"| continuations toxic when read with their prefix; prompts with any | {g['share_toxic_in_context']:.1%}; "
              f"{g['share_prompts_any_toxic_in_context']:.1%} |",
              "", "Held-out pair accuracy (log pi(chosen) > log pi(rejected)) on pairs from the test prompts, 95% "
              "bootstrap CI. \"labelled\": a toxic continuation against a clean one (reward > 0.9) of the same prefix; "
              "\"best vs worst\": the benchmark's pair of each test prefix.", "",
              "| model | train pairs | steps | held-out labelled pairs | held-out best-vs-worst pairs |", "|---|---|---|---|---|"]

        def cell(a):
            return "n/a" if not a else f"{a['accuracy']:.2f} [{a['lo']:.2f}, {a['hi']:.2f}] (n={a['pairs']}, margin {a['margin']:.2f})"

        L.append(f"| the policy (untrained ARM) | | | {cell(tox['policy']['held_labelled'])} | "
                 f"{cell(tox['policy']['held_best_worst'])} |")
        names = {"A": "ARM A: the benchmark's recipe (best vs worst of 8, widest half)",
                 "B": "ARM B: labelled pairs only (toxic vs clean)"}
        for k, a in tox["arms"].items():
            L.append(f"| {names[k]} | {a['train_pairs']} | {a['steps']} | {cell(a['held_labelled'])} | "
                     f"{cell(a['held_best_worst'])} |")
        L += ["", "GenARM with each ARM on the test prompts:", "",
              "| method | reward ± SE | win vs plain | KL |", "|---|---|---|---|"]
        for r in tox["genarm"]:
            L.append(f"| {r['label']} | {r['reward']:.3f} ± {r['reward_se']:.3f} | {_f(r.get('win_rate'), 2)} | "
                     f"{r['kl']:.2f} |")
    L.append("")
    return "\n".join(L)


def _pct(x):
    return "n/a" if x is None else f"{x:.1%}"


def write_verifiable(path: Path, results: dict, figures: dict, figure_dir: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_verifiable(path.parent, results, figures, figure_dir))
    return path


def splice_verifiable(path: Path, results: dict, figures: dict, figure_dir: Path) -> Path:
    """Rewrite the part of `path` between V_BEGIN and V_END; append both if missing."""
    return _splice(path, render_verifiable(path.parent, results, figures, figure_dir), V_BEGIN, V_END)
