"""Token-level guides: models that score every next token and are mixed into the policy each step.

A guide's scores enter the mix as  z = log p_policy / T + sum_i w_i * guide_i.  For an autoregressive
reward model (GenARM) guide_i is its next-token log-prob, so the decoder samples from
p_policy^(1/T) * prod_i p_arm_i^(w_i), normalised per token. For a Q-head value model (tokenwise
controlled decoding) guide_i is Q(prefix, z) and the weight is lambda.

A guide holds its own KV cache and is fed the same tokens as the policy. It returns raw output scores:
a per-row constant (such as an ARM's log-normaliser) cancels when the mix is normalised, so the law
sampled from is the same as with log-probs.
"""

from __future__ import annotations

from typing import Callable

import torch

from ..prompts import PromptBatch, left_pad
from ..session import ModelSession
from ..vocab import shared_width
from .base import Guide, GuideContext


class LMGuideState:
    """A guide model's running state: a session over its own prompts, scores for the next token."""

    fusable = True  # its rows may share the policy's forward passes when it runs the policy's model (joint.py)

    def __init__(self, session: ModelSession, scores: torch.Tensor, out_device: torch.device):
        self.session = session
        self.out_device = out_device
        self.scores = scores.to(out_device)

    def next_scores(self, policy_logits: torch.Tensor) -> torch.Tensor:
        return self.scores

    def advance(self, tokens: torch.Tensor, advance: torch.Tensor | None = None) -> None:
        dev = self.session.device
        adv = None if advance is None else advance.to(dev)
        self.scores = self.session.step(tokens.to(dev), adv).to(self.out_device)

    def select(self, index: torch.Tensor) -> None:
        self.session.select(index.to(self.session.device))
        self.scores = self.scores[index]

    def resume_at(self, response_lengths: torch.Tensor) -> None:
        """Cut each row back to its prompt plus response_lengths[b] response tokens (see ModelSession.resume_at)."""
        lengths = self.session.prompt_len + response_lengths.to(self.session.device)
        self.scores = self.session.resume_at(lengths).to(self.out_device)


class LMGuide(Guide):
    """A causal LM over the policy's vocabulary used as a token-level guide.

    Args:
        model: a transformers causal LM (any size: a small guide can steer a larger policy).
        tokenizer: its tokenizer, checked against the policy's (same tokens, same ids). Padding rows
            beyond the policy tokenizer's length are cut off.
        name: a label for logs and errors.

    Example:
        >>> guide = LMGuide(arm_model, arm_tokenizer)
        >>> AlignedModel(policy, tokenizer=tok, strategy=GenARM(guide, beta=1.0))
    """

    role = "guide"

    def __init__(self, model, tokenizer=None, name: str | None = None):
        if not hasattr(model, "forward") or not hasattr(model, "config"):
            raise TypeError(f"{self.role} model must be a transformers causal LM, got {type(model).__name__}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.name = name or getattr(model.config, "_name_or_path", "") or type(model).__name__
        self._widths: dict[int, int] = {}

    def width_for(self, policy_model, policy_tokenizer) -> int:
        """The common vocabulary width with this policy (checked once per policy)."""
        key = id(policy_model)
        if key not in self._widths:
            self._widths[key] = shared_width(policy_model, policy_tokenizer, self.model, self.tokenizer, self.role)
        return self._widths[key]

    def guide_prompts(self, batch: PromptBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """The guide's own view of the prompts (the policy's by default)."""
        return batch.input_ids, batch.attention_mask

    @torch.no_grad()
    def start(self, context: GuideContext) -> LMGuideState:
        session, scores = self.prefill(context)
        return LMGuideState(session, scores, context.batch.input_ids.device)

    def prefill(self, context: GuideContext) -> tuple[ModelSession, torch.Tensor]:
        """A session of this guide's model over its view of the rows' prompts, and its first scores."""
        session = ModelSession(self.model, vocab_size=context.width)
        ids, mask = self.guide_prompts(context.batch)
        return session, session.prefill(ids.to(session.device), mask.to(session.device))


class ARM(LMGuide):
    """An autoregressive reward model (GenARM): r(x, y) = sum_t log pi_r(y_t | x, y_<t).

    Mixed with weight a = 1/beta it turns the policy into  p(y_t | .) ∝ p_base(y_t | .) * pi_r(y_t | .)^a.
    Train one with `align-decode train-arm`, or steer with a prompted LM (PromptedARM).
    """

    role = "ARM"


def _instruction_turn(tokenizer, instruction: str) -> tuple[str, str] | None:
    """(extra user turn, generation prompt) as the chat template renders them, or None."""
    if getattr(tokenizer, "chat_template", None) is None:
        return None
    base = [{"role": "user", "content": "\x00"}]
    try:
        plain = tokenizer.apply_chat_template(base, tokenize=False)
        opened = tokenizer.apply_chat_template(base, tokenize=False, add_generation_prompt=True)
        two = tokenizer.apply_chat_template(base + [{"role": "user", "content": instruction}], tokenize=False)
    except Exception:
        return None
    if not (opened.startswith(plain) and two.startswith(plain)):
        return None
    return two[len(plain) :], opened[len(plain) :]


class PromptedARM(ARM):
    """An LM conditioned on a steering instruction acts as an ARM without any training.

    The guide reads each prompt with the instruction added; the policy reads the prompt as it is. With
    a chat template the instruction becomes one more user turn just before the assistant's reply;
    otherwise it is put in front of the prompt text. `template` (prompt text -> guide text) overrides both.

    Example:
        >>> arm = PromptedARM(model, tok, "Answer in a warm, upbeat and positive tone.")
        >>> AlignedModel(model, tokenizer=tok, strategy=GenARM(arm, beta=1.0))
    """

    def __init__(
        self,
        model,
        tokenizer,
        instruction: str,
        template: Callable[[str], str] | None = None,
        name: str | None = None,
    ):
        if tokenizer is None:
            raise ValueError("PromptedARM needs the guide model's tokenizer to write the instruction")
        if not instruction or not instruction.strip():
            raise ValueError("PromptedARM instruction must be a non-empty string")
        super().__init__(model, tokenizer, name=name or f"prompted:{instruction[:40]}")
        self.instruction = instruction
        self.template = template
        self._turn = _instruction_turn(tokenizer, instruction)

    def guide_text(self, prompt_text: str) -> str:
        if self.template is not None:
            return self.template(prompt_text)
        if self._turn is not None:
            turn, gen = self._turn
            # Decoded text may lose the template's trailing whitespace: match the generation prompt without it.
            gen, head = gen.rstrip(), prompt_text.rstrip()
            if gen and head.endswith(gen):
                cut = len(head) - len(gen)
                return prompt_text[:cut] + turn + prompt_text[cut:]
        bos = self.tokenizer.bos_token
        if bos and prompt_text.startswith(bos):
            return bos + self.instruction + "\n\n" + prompt_text[len(bos) :]
        return self.instruction + "\n\n" + prompt_text

    def guide_prompts(self, batch: PromptBatch) -> tuple[torch.Tensor, torch.Tensor]:
        texts = self.tokenizer.batch_decode(batch.token_lists(), skip_special_tokens=False)
        encoded = [
            self.tokenizer(self.guide_text(t), add_special_tokens=False)["input_ids"] for t in texts
        ]
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        return left_pad(encoded, pad, device=batch.input_ids.device)
