"""A policy whose weights live in a sampling engine: only its tokenizer and configuration are local.

Best-of-N and QAlign given an engine run every policy forward pass in the engine, so the process that
steers them needs no copy of the model: a 70B policy spread over GPUs by vLLM's tensor parallelism is
steered from a process holding its tokenizer (and the reward model). `engine_generate` is the Python
entry for that case, the counterpart of `AlignedModel.generate` (which wraps a loaded transformers
model, and works just as well with these strategies when the model fits in memory):

    engine = VLLMEngine("/models/policy", tensor_parallel_size=4)
    strategy = BestOfN(reward=rm, n=32, engine=engine)
    out = engine_generate(strategy, engine, ["Tell me a story."], tokenizer=tok, max_new_tokens=256,
                          do_sample=True, temperature=0.8, seed=0)
    out.tokens, out.extras["rewards"]
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from ...decoding.loop import Decoded
from ...decoding.prompts import PromptBatch, left_pad
from ...decoding.settings import GenerationSettings
from ...decoding.strategy import Policy, Strategy
from ...decoding.engine import SamplingEngine


class EngineModel:
    """What the local process knows of an engine-served model: its configuration and generation defaults
    (`GenerationSettings.resolve` reads `generation_config`, as from a loaded model)."""

    def __init__(self, config=None, generation_config=None):
        self.config = config
        self.generation_config = generation_config

    @classmethod
    def from_folder(cls, path) -> "EngineModel":
        from transformers import AutoConfig, GenerationConfig

        path = Path(path)
        generation = GenerationConfig.from_pretrained(path) if (path / "generation_config.json").is_file() else None
        return cls(AutoConfig.from_pretrained(path), generation)


class EnginePolicy(Policy):
    """The policy as a strategy with a sampling engine sees it: a tokenizer, no local forward passes."""

    def __init__(self, tokenizer, model: EngineModel | None = None):
        super().__init__(model=model or EngineModel(), tokenizer=tokenizer)

    @classmethod
    def from_folder(cls, path) -> "EnginePolicy":
        from transformers import AutoTokenizer

        return cls(AutoTokenizer.from_pretrained(path), EngineModel.from_folder(path))

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")  # prompts stay on the host: the engine takes token ids

    def width(self, guides: Sequence = ()) -> int:
        raise _no_local_weights()

    def start(self, batch: PromptBatch, width: int | None = None, repeats: int = 1):
        raise _no_local_weights()


def _no_local_weights() -> RuntimeError:
    return RuntimeError("this policy's weights live in an engine: give the strategy engine=... (BestOfN and "
                        "QAlign take one), or load the model and use AlignedModel")


def engine_generate(
    strategy: Strategy,
    engine: SamplingEngine,
    prompts: Sequence[Sequence[int]] | Sequence[str],
    *,
    tokenizer=None,
    model_folder=None,
    seed=None,
    prompt_texts: Sequence[str] | None = None,
    **generate_kwargs,
) -> Decoded:
    """Run an engine-backed strategy over prompts, with no local copy of the policy.

    Args:
        strategy: BestOfN or QAlign built with this engine.
        prompts: token-id lists, or strings (tokenized as given: apply a chat template first).
        tokenizer: the policy's tokenizer (default: the engine's own).
        model_folder: where the model's generation_config.json is read from, for its defaults (stop ids);
            without it only the tokenizer's EOS stops.
        seed: one int, or one per prompt: a prompt's result depends on its seed alone.
        prompt_texts: the prompts as text for text rewards (default: the strings, or the decoded ids).
        **generate_kwargs: max_new_tokens, do_sample, temperature, top_k, top_p, min_p,
            num_return_sequences, eos_token_id, pad_token_id, as `model.generate()` takes them.

    Returns the strategy's Decoded rows (generated tokens only), prompt-major.
    """
    if getattr(strategy, "engine", None) is not engine:
        raise ValueError(f"{type(strategy).__name__} must be built with engine=<this engine> to run in the engine")
    tokenizer = tokenizer if tokenizer is not None else getattr(engine, "tokenizer", None)
    if prompts and isinstance(prompts[0], str):
        if tokenizer is None:
            raise ValueError("text prompts need a tokenizer")
        prompt_texts = list(prompts) if prompt_texts is None else prompt_texts
        prompts = [tokenizer(text)["input_ids"] for text in prompts]
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("give at least one prompt, each with at least one token")
    if prompt_texts is not None and len(prompt_texts) != len(prompts):
        raise ValueError(f"{len(prompt_texts)} prompt_texts for {len(prompts)} prompts")
    model = EngineModel.from_folder(model_folder) if model_folder is not None else EngineModel()
    settings = GenerationSettings.resolve(model, tokenizer, None, max(len(p) for p in prompts), seed=seed,
                                          **generate_kwargs)
    ids, mask = left_pad(prompts, settings.pad_id)
    batch = PromptBatch(ids, mask, None if prompt_texts is None else list(prompt_texts))
    return strategy.run(EnginePolicy(tokenizer, model), batch, settings)
