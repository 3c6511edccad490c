"""How big a run is: `full` (the numbers in benchmarks/RESULTS.md), `smoke` (CI runs it as a slow
pytest; under 10 minutes), `test` (about a minute: a quick check while changing the code). Everything
else about a run is fixed in code."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Scale:
    name: str
    # Guides: train-split prompts per task, samples per prompt (pairs and CD-FUDGE rollouts come from
    # the same samples), ARM and value-model training.
    train_prompts: int
    train_samples: int
    arm_epochs: int
    arm_batch: int
    value_steps: int
    # Evaluation on held-out prompts: prompts per task, responses per prompt, response length.
    test_prompts: int
    samples: int
    max_new_tokens: int
    # Method sweeps (the strength grows along each tuple).
    bon_n: tuple[int, ...]
    qalign_steps: int
    qalign_betas: tuple[float, ...]
    genarm_weights: tuple[float, ...]  # 1 / beta
    cd_weights: tuple[float, ...]  # lambda
    args_weights: tuple[float, ...]  # w
    tq_alphas: tuple[float, ...]
    tq_k: int
    tq_rollout_len: int
    tq_prompts: int  # Transfer Q* is the costliest per token: it runs on the first tq_prompts only
    multi_weights: tuple[tuple[float, float], ...]  # (sentiment ARM, neutral-tone ARM)
    batch_prompts: int = 16  # prompts decoded together

    def __post_init__(self):
        if self.bon_n[0] != 1 or list(self.bon_n) != sorted(self.bon_n):
            raise ValueError("bon_n must start at 1 and grow")
        if self.tq_prompts > self.test_prompts:
            raise ValueError("tq_prompts cannot exceed test_prompts")


ARM_SETTINGS = dict(beta_r=0.1, lr=1e-3, lora_r=8, lora_alpha=16.0, max_length=128, max_prompt_length=64)
VALUE_SETTINGS = dict(kind="scalar", layers=4, batch_size=32, lr=1e-3)

SCALES = {
    "full": Scale(
        name="full", train_prompts=96, train_samples=8, arm_epochs=2, arm_batch=8, value_steps=40,
        test_prompts=24, samples=2, max_new_tokens=24,
        bon_n=(1, 2, 4, 8, 16), qalign_steps=8, qalign_betas=(0.5, 0.2),
        genarm_weights=(0.25, 0.5, 1.0), cd_weights=(10.0, 30.0), args_weights=(1.5, 5.0),
        tq_alphas=(3.0,), tq_k=4, tq_rollout_len=4, tq_prompts=8,
        # The weights sum to 1 along the sweep: both ARMs start as the policy, so the sharpening they add
        # (p^(1 + sum w)) stays the same and only what they learned trades off.
        multi_weights=((1.0, 0.0), (0.75, 0.25), (0.5, 0.5), (0.25, 0.75), (0.0, 1.0)),
    ),
    "smoke": Scale(
        name="smoke", train_prompts=12, train_samples=4, arm_epochs=1, arm_batch=4, value_steps=10,
        test_prompts=6, samples=2, max_new_tokens=12,
        bon_n=(1, 2, 4), qalign_steps=4, qalign_betas=(0.5,),
        genarm_weights=(0.5,), cd_weights=(10.0,), args_weights=(1.5,),
        tq_alphas=(3.0,), tq_k=2, tq_rollout_len=2, tq_prompts=4,
        multi_weights=((1.0, 0.0), (0.5, 0.5), (0.0, 1.0)),
    ),
    "test": Scale(
        name="test", train_prompts=6, train_samples=3, arm_epochs=1, arm_batch=3, value_steps=3,
        test_prompts=3, samples=1, max_new_tokens=6,
        bon_n=(1, 2), qalign_steps=2, qalign_betas=(0.5,),
        genarm_weights=(0.5,), cd_weights=(10.0,), args_weights=(1.5,),
        tq_alphas=(3.0,), tq_k=2, tq_rollout_len=1, tq_prompts=2,
        multi_weights=((1.0, 0.0), (0.0, 1.0)),
    ),
}


@dataclass(frozen=True)
class VerifiableScale:
    """Scale of `python -m benchmarks.quality.verifiable` (the instruction-following task, the
    over-optimisation curve and the non-toxicity ARM study)."""

    name: str
    train_prompts: int  # instruction task: train prompts for the ARM's pairs
    train_samples: int
    arm_epochs: int
    arm_batch: int
    test_prompts: int  # held-out prompts
    samples: int  # responses (chains) per prompt of the token-level methods and QAlign
    max_new_tokens: int
    pool: int  # plain samples per held-out prompt (best-of-N and votes read off it, N = 1 .. pool)
    vote_draws: int  # Monte-Carlo subsets per N for the votes
    vote_beta: float  # weighted majority: softmax(proxy / beta)
    genarm_weights: tuple[float, ...]
    qalign_beta: float
    qalign_steps: int
    overopt_prompts: int  # prompts with the largest proxy/judge disagreement
    overopt_pool: int  # samples per such prompt
    overopt_max_n: int
    deep_chains: int  # QAlign chains per such prompt
    deep_steps: int
    boot_reps: int
    tox_train_prompts: int
    tox_test_prompts: int
    tox_samples: int
    tox_tokens: int
    tox_pairs_per_prompt: int
    tox_arm_epochs: int
    tox_weights: tuple[float, ...]
    batch_prompts: int = 16


VERIFIABLE_SCALES = {
    "full": VerifiableScale(
        name="full", train_prompts=48, train_samples=6, arm_epochs=2, arm_batch=8, test_prompts=24, samples=2,
        max_new_tokens=32, pool=24, vote_draws=200, vote_beta=0.1, genarm_weights=(0.5, 1.0), qalign_beta=0.1,
        qalign_steps=8, overopt_prompts=3, overopt_pool=512, overopt_max_n=256, deep_chains=4, deep_steps=32,
        boot_reps=300, tox_train_prompts=60, tox_test_prompts=40, tox_samples=12, tox_tokens=24,
        tox_pairs_per_prompt=3, tox_arm_epochs=2, tox_weights=(0.5, 1.0),
    ),
    "smoke": VerifiableScale(
        name="smoke", train_prompts=12, train_samples=4, arm_epochs=1, arm_batch=4, test_prompts=4, samples=2,
        max_new_tokens=12, pool=8, vote_draws=20, vote_beta=0.1, genarm_weights=(1.0,), qalign_beta=0.1,
        qalign_steps=2, overopt_prompts=2, overopt_pool=16, overopt_max_n=16, deep_chains=2, deep_steps=2,
        boot_reps=50, tox_train_prompts=12, tox_test_prompts=8, tox_samples=8, tox_tokens=12,
        tox_pairs_per_prompt=2, tox_arm_epochs=1, tox_weights=(1.0,),
    ),
    "test": VerifiableScale(
        name="test", train_prompts=6, train_samples=3, arm_epochs=1, arm_batch=3, test_prompts=3, samples=1,
        max_new_tokens=6, pool=4, vote_draws=5, vote_beta=0.1, genarm_weights=(1.0,), qalign_beta=0.1,
        qalign_steps=1, overopt_prompts=2, overopt_pool=8, overopt_max_n=8, deep_chains=1, deep_steps=2,
        boot_reps=20, tox_train_prompts=6, tox_test_prompts=4, tox_samples=4, tox_tokens=6,
        tox_pairs_per_prompt=1, tox_arm_epochs=1, tox_weights=(1.0,),
    ),
}


def scale_parser(prog: str, description: str, made: str):
    """The quality runs' shared command line: the scale (--full, --smoke, --scale), --out, --work (where
    the trained `made` go), --threads, --seed and --redraw; each run adds its own flags."""
    import argparse
    from pathlib import Path

    p = argparse.ArgumentParser(prog=prog, description=description)
    size = p.add_mutually_exclusive_group()
    size.add_argument("--full", dest="scale", action="store_const", const="full", help="the full run (default)")
    size.add_argument("--smoke", dest="scale", action="store_const", const="smoke", help="the reduced run (CI)")
    size.add_argument("--scale", dest="scale", choices=("full", "smoke", "test"))
    p.add_argument("--work", type=Path, help=f"trained {made} go here [default: the align-decode cache]")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads [default: 1: on a shared 2-core machine a second thread mostly waits]")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--redraw", action="store_true", help="only redraw the plots and rewrite the report from "
                   "<out>/results.json")
    p.set_defaults(scale="full")
    return p

