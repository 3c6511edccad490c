"""The benchmark's figures, drawn from the metric rows alone (so they can be redrawn from results.json)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

STYLE = {  # family: (legend name, colour, marker)
    "sample": ("plain sampling", "black", "*"),
    "best_of_n": ("best-of-N", "tab:blue", "o"),
    "qalign": ("QAlign", "tab:orange", "s"),
    "genarm_trained": ("GenARM, trained ARM", "tab:green", "^"),
    "genarm_untrained": ("GenARM, untrained ARM", "tab:olive", "v"),
    "genarm_prompted": ("GenARM, prompted ARM", "tab:purple", "D"),
    "cd_tokenwise": ("tokenwise CD (CD-FUDGE)", "tab:red", "P"),
    "args": ("ARGS", "tab:brown", "X"),
    "transfer_q": ("Transfer Q*", "tab:pink", "h"),
    "genarm_multi": ("GenARM, two ARMs", "tab:cyan", "o"),
}


def _family(rows, family):
    return [r for r in rows if r["family"] == family]


def _final_qalign(rows):
    """QAlign's points on the KL axis: the last step of each beta (its KL is its target's)."""
    q = _family(rows, "qalign")
    last = max((r["steps"] for r in q), default=None)
    return sorted([r for r in q if r["steps"] == last], key=lambda r: r["kl"])


def reward_vs_kl(rows, task: str, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for family, (name, colour, marker) in STYLE.items():
        pts = _final_qalign(rows) if family == "qalign" else sorted(_family(rows, family), key=lambda r: r["kl"])
        if family == "genarm_multi" or not pts:
            continue
        ax.errorbar([r["kl"] for r in pts], [r["reward"] for r in pts], yerr=[r["reward_se"] for r in pts],
                    color=colour, marker=marker, label=name, capsize=2, lw=1.2, ms=5)
    ax.set_xscale("symlog", linthresh=0.1)
    ax.set_xlabel("KL(method || policy), nats per response")
    ax.set_ylabel(f"mean reward ({task})")
    ax.set_title(f"{task}: reward against KL to the policy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    return _save(fig, path)


def reward_vs_compute(rows, task: str, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for family, (name, colour, marker) in STYLE.items():
        pts = _family(rows, family)
        if family == "genarm_multi" or not pts:
            continue
        if family == "qalign":
            for beta in sorted({r["beta"] for r in pts}):
                curve = sorted([r for r in pts if r["beta"] == beta], key=lambda r: r["compute"])
                ax.plot([r["compute"] for r in curve], [r["reward"] for r in curve], color=colour, marker=marker,
                        ls="-" if beta == max(r["beta"] for r in pts) else "--", label=f"{name} beta={beta}", ms=4)
            continue
        pts = sorted(pts, key=lambda r: (r["compute"], r["param"] or 0))
        ax.plot([r["compute"] for r in pts], [r["reward"] for r in pts], color=colour, marker=marker, label=name,
                ms=5, lw=1 if family == "best_of_n" else 0)
    ax.set_xscale("log")
    ax.set_xlabel("forward tokens per response (policy-size units)")
    ax.set_ylabel(f"mean reward ({task})")
    ax.set_title(f"{task}: reward against compute (N, steps, weights grow)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="best")
    return _save(fig, path)


def over_optimisation(rows, proxy: str, judge: str, path: Path) -> Path:
    """Proxy reward (what the method optimises) and judge (an independent scorer) as N / steps grow,
    on one compute axis."""
    fig, axes = plt.subplots(1, 2, figsize=(9.6, 3.9), sharex=True)
    series = [("best-of-N", "tab:blue", "o", sorted(_family(rows, "best_of_n"), key=lambda r: r["compute"]))]
    q = _family(rows, "qalign")
    for beta in sorted({r["beta"] for r in q}, reverse=True):
        series.append((f"QAlign beta={beta}", "tab:orange", "s" if beta == max(r["beta"] for r in q) else "d",
                       sorted([r for r in q if r["beta"] == beta], key=lambda r: r["compute"])))
    for ax, (key, err, title) in zip(axes, (("reward", "reward_se", f"proxy: {proxy}"),
                                           (f"{judge}_mean", f"{judge}_se", f"judge: {judge}"))):
        for name, colour, marker, pts in series:
            ax.errorbar([r["compute"] for r in pts], [r[key] for r in pts], yerr=[r[err] for r in pts], color=colour,
                        marker=marker, label=name, capsize=2, ms=4, lw=1.2, alpha=0.9 if marker != "d" else 0.6)
        ax.set_xscale("log")
        ax.set_xlabel("forward tokens per response")
        ax.set_title(title)
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel("mean score")
    axes[0].legend(fontsize=7)
    fig.suptitle("Over-optimisation: best-of-N (N = 1, 2, 4, ...) against QAlign (steps = 0, 1, 2, 4, ...)", fontsize=9)
    return _save(fig, path)


def multi_objective(rows, x_name: str, y_name: str, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(5.6, 4.4))
    pts = _family(rows, "genarm_multi")
    x_key, y_key = lambda r: r["reward"] if r.get("reward_name") == x_name else r[f"{x_name}_mean"], \
        lambda r: r["reward"] if r.get("reward_name") == y_name else r[f"{y_name}_mean"]
    ax.plot([x_key(r) for r in pts], [y_key(r) for r in pts], "o-", color="tab:cyan", label="GenARM, two ARMs")
    for r in pts:
        ax.annotate(f"({r['weights'][0]:g}, {r['weights'][1]:g})", (x_key(r), y_key(r)), fontsize=7,
                    textcoords="offset points", xytext=(4, 4))
    for r in _family(rows, "sample"):
        ax.plot([x_key(r)], [y_key(r)], "*", color="black", ms=10, label="plain sampling")
    ax.set_xlabel(f"mean {x_name}")
    ax.set_ylabel(f"mean {y_name}")
    ax.set_title(f"Two ARMs, weights ({x_name} ARM, {y_name} ARM) swept", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


VERIFIABLE_STYLE = {
    "best_of_n": ("best-of-N (soft proxy)", "tab:blue", "o", "-"),
    "best_of_n_arm": ("best-of-N (ARM proxy)", "tab:cyan", "o", "--"),
    "majority": ("majority vote", "tab:gray", "x", ":"),
    "weighted_majority": ("weighted majority (soft)", "tab:olive", "+", ":"),
    "qalign": ("QAlign (soft proxy)", "tab:orange", "s", "-"),
    "sample": ("plain sampling", "black", "*", ""),
    "genarm_trained": ("GenARM, verifier ARM", "tab:green", "^", ""),
    "genarm_untrained": ("GenARM, untrained ARM", "tab:olive", "v", ""),
}


def verifiable_vs_compute(rows, path: Path) -> Path:
    """Soft proxy and strict judge against forward tokens per response, every method of the task."""
    fig, axes = plt.subplots(1, 2, figsize=(10.4, 4.2), sharex=True)
    for ax, key, err, title in ((axes[0], "reward", "reward_se", "proxy: soft partial checker"),
                                (axes[1], "strict_mean", "strict_se", "judge: strict verifier (all instructions)")):
        for family, (name, colour, marker, ls) in VERIFIABLE_STYLE.items():
            pts = sorted(_family(rows, family), key=lambda r: (r["compute"], r.get("param") or 0))
            if not pts:
                continue
            ax.errorbar([r["compute"] for r in pts], [r[key] for r in pts], yerr=[r.get(err, 0) or 0 for r in pts],
                        color=colour, marker=marker, ls=ls or "none", label=name, capsize=2, ms=4, lw=1.1)
        ax.set_xscale("log")
        ax.set_xlabel("forward tokens per response (policy-size units)")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel("mean score over held-out prompts")
    axes[1].legend(fontsize=7, loc="best")
    fig.suptitle("Instruction following (IFEval-style): score against compute (N, steps, weights grow)", fontsize=9)
    return _save(fig, path)


def verifiable_overopt(over, path: Path) -> Path:
    """Best-of-N to N = 256 with each proxy (95% bootstrap bands), and QAlign's chains, on the prompts
    where proxy and judge disagree most."""
    fig, axes = plt.subplots(1, 2, figsize=(10.4, 4.2))
    x = over["bon_compute"]  # forward tokens per response of best-of-N at each N
    for proxy, colour in (("soft", "tab:blue"), ("arm", "tab:cyan")):
        c = over[proxy]
        axes[1].plot(x, c["judge"], "o-", color=colour, ms=4, label=f"best-of-N, {proxy} proxy (N = {over['ns'][0]}"
                     f" .. {over['ns'][-1]})")
        axes[1].fill_between(x, c["judge_lo"], c["judge_hi"], color=colour, alpha=0.15)
        axes[0].plot(x, c["soft"], "o-", color=colour, ms=4, label=f"best-of-N, {proxy} proxy")
    q = over["qalign"]
    xq = [r["compute"] for r in q]
    axes[1].errorbar(xq, [r["judge"] for r in q], yerr=[[r["judge"] - r["judge_lo"] for r in q],
                                                       [r["judge_hi"] - r["judge"] for r in q]],
                     color="tab:orange", marker="s", ms=4, capsize=2,
                     label=f"QAlign beta={over['qalign_beta']} (steps 0 .. {q[-1]['steps']})")
    axes[0].plot(xq, [r["proxy"] for r in q], "s-", color="tab:orange", ms=4, label="QAlign (soft proxy)")
    for ax, title in ((axes[0], "soft proxy of the chosen response"), (axes[1], "strict judge (95% bootstrap band)")):
        ax.set_xscale("log")
        ax.set_xlabel("forward tokens per response (policy-size units)")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3, which="both")
    axes[1].legend(fontsize=7)
    fig.suptitle(f"Over-optimisation on the {len(over['prompts'])} held-out prompts where proxy and judge disagree "
                 f"most ({over['pool']} samples each)", fontsize=9)
    return _save(fig, path)
