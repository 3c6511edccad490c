"""Shared fixtures for the vLLM plugin tests: tiny policy and guide folders saved once per session."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tiny import tiny_llama, tiny_tokenizer

POLICY_SEED, ARM_SEED, ARM2_SEED = 0, 1, 2


def save_models(root: Path) -> dict[str, Path]:
    """A tiny policy and two tiny ARMs sharing its tokenizer, as local folders vLLM can load."""
    tok = tiny_tokenizer()
    paths = {}
    for name, seed in (("policy", POLICY_SEED), ("arm", ARM_SEED), ("arm2", ARM2_SEED)):
        path = root / name
        if not (path / "config.json").exists():
            tiny_llama(seed=seed).save_pretrained(path)
            tok.save_pretrained(path)
        paths[name] = path
    return paths


def guides_env(paths: dict[str, Path]) -> str:
    return json.dumps({"arm": {"path": str(paths["arm"])}, "arm2": {"path": str(paths["arm2"]), "kind": "qhead"}})


def load(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@torch.no_grad()
def guide_scores(model, tokens, width: int) -> torch.Tensor:
    """A guide's raw next-token scores after `tokens`, computed from scratch."""
    return model(input_ids=torch.tensor([list(tokens)])).logits[0, -1, :width].float()
