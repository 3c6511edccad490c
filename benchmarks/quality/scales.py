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
