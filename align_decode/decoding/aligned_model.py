"""A drop-in wrapper: `AlignedModel(model, tokenizer=..., strategy=...).generate(...)` takes what
`model.generate()` takes for decoder-only models and returns the same types."""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers.generation.utils import GenerateDecoderOnlyOutput

from .prompts import PromptBatch
from .settings import GenerationSettings
from .strategy import Policy, Sample, Strategy

# Inputs of model.generate() that change what a decoder-only model computes and that align-decode does
# not take: refused by name rather than ignored.
_REFUSED_INPUTS = {
    "inputs_embeds": "pass input_ids",
    "logits_processor": "put the logic in a strategy or guide",
    "stopping_criteria": "use eos_token_id (several ids allowed)",
    "prefix_allowed_tokens_fn": "not supported",
    "assistant_model": "speculative decoding is not supported",
    "negative_prompt_ids": "classifier-free guidance is not supported",
    "negative_prompt_attention_mask": "classifier-free guidance is not supported",
    "custom_generate": "not supported",
    "synced_gpus": "not supported",
    "position_ids": "positions are derived from attention_mask",
    "past_key_values": "align-decode manages its own caches",
    "cache": "align-decode manages its own caches",
    "stop_strings": "use eos_token_id",
}


def _check_one_segment(model, token_type_ids, ids: torch.Tensor) -> None:
    """Accept token_type_ids only where dropping them changes nothing.

    transformers 4.x tokenizers built on PreTrainedTokenizerFast return token_type_ids (all zeros) by
    default, so `generate(**tok(...))` passes them. All zeros is one segment, which a decoder-only model
    whose forward takes no segment ids never sees: accepted and dropped. A non-zero segment, or a model
    whose forward embeds token_type_ids (GPT-2's adds an embedding even for zeros), is refused: align-decode
    does not pass segment ids to the model, so it would not compute what model.generate() computes.
    """
    types = torch.as_tensor(token_type_ids)
    if types.ndim == 1:
        types = types.unsqueeze(0)
    if tuple(types.shape) != tuple(ids.shape):
        raise ValueError(f"token_type_ids must have input_ids' shape {tuple(ids.shape)}, got {tuple(types.shape)}")
    if bool((types != 0).any()):
        raise ValueError(
            "generate() argument token_type_ids with a non-zero segment id is not supported by align-decode: "
            "it decodes a single segment; pass all-zero token_type_ids or none (a tokenizer's "
            "return_token_type_ids=False)"
        )
    try:
        takes_segments = "token_type_ids" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        takes_segments = False
    if takes_segments:
        raise ValueError(
            f"generate() argument token_type_ids is not supported by align-decode for {type(model).__name__}: "
            "its forward embeds segment ids (even all-zero ones change its output) and align-decode does not "
            "pass them; drop token_type_ids (a tokenizer's return_token_type_ids=False)"
        )


@dataclass
class AlignedGenerateOutput(GenerateDecoderOnlyOutput):
    """model.generate()'s output object, plus what the alignment method produced (candidates, rewards,
    chain traces, accounting) under `alignment`."""

    alignment: dict[str, Any] | None = field(default=None)


class AlignedModel:
    """Wrap a transformers causal LM so its generate() decodes with an alignment strategy.

    Args:
        model: the policy, a transformers causal LM (decoder-only).
        tokenizer: its tokenizer (needed for guides' vocabulary checks, text rewards and defaults).
        strategy: a Strategy (GenARM, BestOfN, QAlign, ...); plain decoding when None.

    Example:
        >>> aligned = AlignedModel(model, tokenizer=tok, strategy=GenARM(PromptedARM(model, tok, "Be kind."), beta=1.0))
        >>> out = aligned.generate(**tok(["Hello"], return_tensors="pt"), max_new_tokens=32, do_sample=True)

    Beyond model.generate()'s arguments, generate() takes `seed` (one int, or one per prompt: a row's
    draws depend only on its seed), `strategy` (another strategy for this call, e.g. new GenARM weights)
    and `prompt_texts` (the prompts as text, for sequence rewards; decoded from the ids otherwise).
    """

    def __init__(self, model, tokenizer=None, strategy: Strategy | None = None):
        if getattr(model.config, "is_encoder_decoder", False):
            raise ValueError("AlignedModel wraps decoder-only causal LMs; this model is an encoder-decoder")
        if strategy is not None and not isinstance(strategy, Strategy):
            raise TypeError(f"strategy must be an align_decode Strategy, got {type(strategy).__name__}")
        self.model = model
        self.tokenizer = tokenizer
        self.strategy = strategy or Sample()

    def __getattr__(self, name):
        # Everything else (config, device, generation_config, ...) is the wrapped model's.
        if name in ("model", "tokenizer", "strategy"):
            raise AttributeError(name)
        return getattr(self.model, name)

    def __call__(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    @torch.no_grad()
    def generate(
        self,
        inputs: torch.Tensor | None = None,
        generation_config=None,
        streamer=None,
        *,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        seed=None,
        strategy: Strategy | None = None,
        prompt_texts: list[str] | None = None,
        **kwargs,
    ):
        token_type_ids = kwargs.pop("token_type_ids", None)
        for name, hint in _REFUSED_INPUTS.items():
            if kwargs.get(name) is not None:
                raise ValueError(f"generate() argument {name} is not supported by align-decode: {hint}")
        if inputs is not None and input_ids is not None:
            raise ValueError("pass the prompt ids once: either inputs or input_ids")
        ids = inputs if inputs is not None else input_ids
        if ids is None:
            raise ValueError("generate() needs input_ids (the prompt token ids, [batch, length])")
        if not torch.is_tensor(ids) or ids.dtype not in (torch.long, torch.int, torch.int32):
            raise ValueError("input_ids must be an integer tensor of token ids")
        if ids.ndim == 1:
            ids = ids.unsqueeze(0)
        if ids.ndim != 2 or ids.shape[1] == 0:
            raise ValueError(f"input_ids must be [batch, length] with length >= 1, got shape {tuple(ids.shape)}")
        ids = ids.long()
        if token_type_ids is not None:
            _check_one_segment(self.model, token_type_ids, ids)
        if attention_mask is None:
            attention_mask = torch.ones_like(ids)
        strategy = strategy or self.strategy
        if not isinstance(strategy, Strategy):
            raise TypeError(f"strategy must be an align_decode Strategy, got {type(strategy).__name__}")
        settings = GenerationSettings.resolve(
            self.model, self.tokenizer, generation_config, ids.shape[1], streamer=streamer, seed=seed, **kwargs
        )
        if settings.output_scores and not strategy.gives_scores:
            raise ValueError(
                f"output_scores is not available with {strategy.name}: its outputs are chosen among whole "
                "sequences, not drawn from one per-step law; the drawn tokens' log-probs are in "
                "output.alignment['logprobs'] with return_dict_in_generate=True"
            )
        if prompt_texts is not None and len(prompt_texts) != ids.shape[0]:
            raise ValueError(f"{len(prompt_texts)} prompt_texts for {ids.shape[0]} prompts")
        batch = PromptBatch(ids, attention_mask, prompt_texts)
        if streamer is not None:
            streamer.put(ids.cpu())
        streams_itself = strategy.streams
        if not streams_itself:
            settings.streamer = None
        result = strategy.run(Policy(self.model, self.tokenizer), batch, settings)
        if streamer is not None and not streams_itself:
            for t in range(result.tokens.shape[1]):
                streamer.put(result.tokens[:, t].cpu())
            streamer.end()

        n = result.tokens.shape[0] // ids.shape[0]
        prompt = ids.to(result.tokens.device).repeat_interleave(n, dim=0)
        sequences = torch.cat([prompt, result.tokens], dim=1)
        if not settings.return_dict_in_generate:
            return sequences
        scores = tuple(result.scores) if (settings.output_scores and result.scores is not None) else None
        alignment = {"method": strategy.name, "lengths": result.lengths, "stopped": result.stopped,
                     "logprobs": result.logprobs, **result.extras}
        return AlignedGenerateOutput(sequences=sequences, scores=scores, alignment=alignment)
