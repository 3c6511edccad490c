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
    text = render_report(path.parent, run, rows, figures, figure_dir)
    old = path.read_text() if path.is_file() else ""
    if BEGIN in old and END in old:
        head, rest = old.split(BEGIN, 1)
        tail = rest.split(END, 1)[1]
    else:
        head, tail = old + ("\n" if old else ""), "\n"
    path.write_text(f"{head}{BEGIN}\n{text}\n{END}{tail}")
    return path
