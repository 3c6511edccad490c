"""Value models for controlled decoding: V(x, y_<=t), the policy's expected reward from a prefix on.

Controlled decoding (Mudgal et al., 2024) samples  pi(z | x, y) ∝ p(z | x, y) * exp(lambda * V(x, y + z)),
so each step needs V at every candidate next token. Two shapes of model give it:

- a Q-head model (`QValueModel`): a causal LM over the policy's vocabulary whose raw output at a prefix
  is Q(x, y, z) = V(x, y + z) for every next token z at once. It plugs into the loop like an ARM: its
  own KV cache, one forward per token, its outputs used as the guide's scores.
- a scalar prefix scorer, read on the policy's top-k candidates only (-inf elsewhere, see
  `TopKGuide`): `ScalarValueModel` (a sequence-classification model over the policy's tokens, with a
  KV cache: the B*k candidates are one forward of one token each) or `PrefixRewardGuide` (any sequence
  reward applied to partial responses: one reward call for the B*k candidates, as ARGS needs).

Every value model also scores whole prefixes through `score_ids(prompt_ids, completion_ids)`, the
interface sequence rewards use, so blockwise CD and best-of-N can rank candidates with it.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Sequence

import torch

from ..candidates import score_completions
from ..prompts import PromptBatch, left_pad
from ..session import ModelSession
from ..vocab import shared_width
from ...transformers_compat import forward_with_cache
from ...validation import AT_LEAST_ONE
from .base import GuideContext
from .lm import LMGuide, LMGuideState
from .topk import TopKGuide, TopKGuideState


def check_values(values: torch.Tensor, name: str) -> torch.Tensor:
    """Values must be finite: exp(lambda * V) with V = ±inf or NaN is no distribution."""
    bad = ~torch.isfinite(values)
    if bool(bad.any()):
        rows = bad.reshape(values.shape[0], -1).any(-1).nonzero().flatten().tolist() if values.ndim else []
        raise ValueError(f"value model {name!r} produced non-finite values (NaN or ±inf) for row(s) {rows}")
    return values


def _chunks(count: int, size: int):
    for start in range(0, count, size):
        yield slice(start, min(start + size, count))


def _check_batch_size(batch_size) -> int:
    return AT_LEAST_ONE.check(batch_size, "batch_size")


# ------------------------------------------------------------------------------------------ Q-head
class QValueState(LMGuideState):
    """An LMGuideState whose scores are values, checked finite before every draw."""

    def __init__(self, session: ModelSession, scores: torch.Tensor, out_device: torch.device, name: str):
        super().__init__(session, scores, out_device)
        self.name = name

    def next_scores(self, policy_logits: torch.Tensor) -> torch.Tensor:
        return check_values(self.scores, self.name)


class QValueModel(LMGuide):
    """A Q-head value model: a causal LM whose raw output for token z at a prefix is V(x, y + z).

    Mixed with weight lambda it turns the policy into  pi(z | .) ∝ p(z | .)^(1/T) * exp(lambda * Q(., z)),
    all next tokens at once, one forward per token with its own KV cache. Train one with
    `align_decode.training.train_cd_fudge` (CD-FUDGE) and load it back with `load_value_model`.

    Args:
        model: a transformers causal LM over the policy's vocabulary (any size).
        tokenizer: its tokenizer, checked against the policy's; rows past its length are cut off.
        name: a label for logs and errors.
        batch_size: pairs per forward pass in `score_ids`.

    Example:
        >>> value = QValueModel(AutoModelForCausalLM.from_pretrained("out/value"), tok)
        >>> AlignedModel(policy, tokenizer=tok, strategy=TokenwiseCD(value, strength=2.0))
    """

    role = "value model"

    def __init__(self, model, tokenizer=None, name: str | None = None, batch_size: int = 64):
        super().__init__(model, tokenizer, name=name)
        self.batch_size = _check_batch_size(batch_size)

    @torch.no_grad()
    def start(self, context: GuideContext) -> QValueState:
        session, scores = self.prefill(context)
        return QValueState(session, scores, context.batch.input_ids.device, self.name)

    @torch.no_grad()
    def score_ids(self, prompt_ids: Sequence[Sequence[int]], completion_ids: Sequence[Sequence[int]]) -> torch.Tensor:
        """V(x, y) = Q(x, y_<T, y_T) for each (prompt, non-empty completion): the value of the whole prefix."""
        if any(len(c) == 0 for c in completion_ids):
            raise ValueError(f"{self.name}: a Q-head scores a prefix by its last token; a completion is empty")
        out = torch.zeros(len(completion_ids))
        device = next(self.model.parameters()).device
        for part in _chunks(len(completion_ids), self.batch_size):
            heads = [list(p) + list(c[:-1]) for p, c in zip(prompt_ids[part], completion_ids[part])]
            ids, mask = left_pad(heads, 0, device)
            logits = ModelSession(self.model).prefill(ids, mask)
            last = torch.tensor([c[-1] for c in completion_ids[part]], device=logits.device)
            out[part] = logits.gather(-1, last.unsqueeze(-1)).squeeze(-1).cpu()
        return check_values(out, self.name)


# ------------------------------------------------------------------------------------ scalar head
class _PerPositionValues(torch.nn.Module):
    """A sequence-classification model read at every position instead of pooled at the last token:
    `logits` [B, L, 1] is the head on each token's hidden state, the value of the prefix ending there.
    Shaped like a causal LM's output so a ModelSession can keep its KV cache."""

    def __init__(self, model, label: int):
        super().__init__()
        prefix = getattr(model, "base_model_prefix", "")
        backbone = getattr(model, prefix, None) if prefix else None
        head = getattr(model, "score", None)
        if backbone is None or not isinstance(head, torch.nn.Module):
            raise TypeError(
                f"a scalar value model must be a transformers sequence-classification model with a `score` "
                f"head (AutoModelForSequenceClassification), got {type(model).__name__}"
            )
        num_labels = int(getattr(head, "out_features", getattr(model.config, "num_labels", 1)))
        if not isinstance(label, int) or not 0 <= label < num_labels:
            raise ValueError(f"label must be an integer in [0, {num_labels}), got {label!r}")
        self.backbone, self.head, self.label = backbone, head, label
        self.config = backbone.config

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache=None, use_cache=True, **_):
        out, cache = forward_with_cache(self.backbone, cache, input_ids=input_ids, attention_mask=attention_mask,
                                        position_ids=position_ids)
        values = self.head(out.last_hidden_state)[..., self.label : self.label + 1]
        return SimpleNamespace(logits=values, cache=cache)


class _CachedValueState(TopKGuideState):
    """A top-k guide state that also keeps the value model's KV cache of each row's prefix."""

    def __init__(self, guide, batch: PromptBatch, session: ModelSession):
        super().__init__(guide, batch)
        self.session = session
        self.fork: ModelSession | None = None  # [B * k] rows: each prefix + one candidate
        self.fork_candidates: torch.Tensor | None = None


class ScalarValueModel(TopKGuide):
    """A scalar prefix scorer V(x, y_<=t) read on the policy's top-k next tokens, with a KV cache.

    Each step the B rows' cached prefixes are forked k times and fed their k candidates: one forward of
    B*k tokens gives every V(x, y + v). The chosen candidate's fork becomes the row's cache, so the
    prefix is never recomputed (ARGS's official code reorders its reward model's cache the same way).
    Outside the candidates the guide scores -inf, which restricts the draw to them.

    Args:
        model: a transformers sequence-classification model (e.g. LlamaForSequenceClassification with
            num_labels=1) over the policy's token ids; its head is read at the prefix's last token.
        tokenizer: its tokenizer, checked against the policy's.
        k: candidates per step, 1 <= k <= vocabulary size.
        label: which output of the head is the value (for heads with several outputs).
        name: a label for logs and errors.
        batch_size: pairs per forward pass in `score_ids`.

    Example:
        >>> value = ScalarValueModel(AutoModelForSequenceClassification.from_pretrained("out/v"), tok, k=10)
        >>> AlignedModel(policy, tokenizer=tok, strategy=TokenwiseCD(value, strength=1.0))
    """

    role = "value model"

    def __init__(self, model, tokenizer=None, k: int = 10, label: int = 0, name: str | None = None,
                 batch_size: int = 64):
        super().__init__(k)
        if not hasattr(model, "forward") or not hasattr(model, "config"):
            raise TypeError(f"value model must be a transformers model, got {type(model).__name__}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.label = label
        self.values = _PerPositionValues(self.model, label)
        self.name = name or getattr(model.config, "_name_or_path", "") or type(model).__name__
        self.batch_size = _check_batch_size(batch_size)

    def with_k(self, k: int) -> "ScalarValueModel":
        """The same model scoring k candidates per step."""
        if k == self.k:
            return self
        return ScalarValueModel(self.model, self.tokenizer, k=k, label=self.label, name=self.name,
                                batch_size=self.batch_size)

    def width_for(self, policy_model, policy_tokenizer) -> int:
        width = shared_width(policy_model, policy_tokenizer, self.model, self.tokenizer, self.role)
        if self.k > width:
            raise ValueError(f"k={self.k} is larger than the vocabulary ({width} tokens)")
        return width

    @torch.no_grad()
    def start(self, context: GuideContext) -> _CachedValueState:
        batch = context.batch
        session = ModelSession(self.values)
        session.prefill(batch.input_ids.to(session.device), batch.attention_mask.to(session.device))
        return _CachedValueState(self, batch, session)

    @torch.no_grad()
    def score_candidates(self, state: _CachedValueState, candidates: torch.Tensor) -> torch.Tensor:
        rows, k = candidates.shape
        session = state.session
        fork = session.fork(torch.arange(rows, device=session.device).repeat_interleave(k))
        values = fork.step(candidates.reshape(-1).to(session.device)).view(rows, k)
        state.fork, state.fork_candidates = fork, candidates
        return check_values(values, self.name).to(candidates.device)

    @torch.no_grad()
    def after_advance(self, state: _CachedValueState, tokens: torch.Tensor, advance: torch.Tensor | None) -> None:
        fork, candidates = state.fork, state.fork_candidates
        state.fork = state.fork_candidates = None
        session = state.session
        moving = torch.ones_like(tokens, dtype=torch.bool) if advance is None else advance.to(tokens.device).bool()
        hit = candidates.to(tokens.device) == tokens.unsqueeze(-1) if fork is not None else None
        if hit is None or not bool((hit.any(-1) | ~moving).all()):
            # A token outside the candidates (another guide widened the draw): feed it the plain way.
            session.step(tokens.to(session.device), None if advance is None else moving.to(session.device))
            return
        k = candidates.shape[1]
        # The fork of the chosen candidate already holds prefix + token: keep it, compute nothing.
        choice = hit.long().argmax(-1)
        index = torch.arange(tokens.shape[0], device=tokens.device) * k + choice
        fork.select(index.to(fork.device))
        if not bool(moving.all()):
            # Rows that take no token (finished, kept for the caller) drop the candidate again.
            fork.keep_prefix(fork.next_pos - (~moving).long().to(fork.device))
        else:
            fork.maybe_compact()
        state.session = fork

    def after_select(self, state: _CachedValueState, index: torch.Tensor) -> None:
        state.session.select(index.to(state.session.device))
        state.fork = state.fork_candidates = None

    @torch.no_grad()
    def score_ids(self, prompt_ids: Sequence[Sequence[int]], completion_ids: Sequence[Sequence[int]]) -> torch.Tensor:
        """V(x, y) for each (prompt, completion), computed from scratch (no cache)."""
        out = torch.zeros(len(completion_ids))
        device = next(self.model.parameters()).device
        for part in _chunks(len(completion_ids), self.batch_size):
            seqs = [list(p) + list(c) for p, c in zip(prompt_ids[part], completion_ids[part])]
            ids, mask = left_pad(seqs, 0, device)
            out[part] = ModelSession(self.values).prefill(ids, mask).squeeze(-1).cpu()
        return check_values(out, self.name)


# ----------------------------------------------------------------------------- rewards on prefixes
class PrefixRewardGuide(TopKGuide):
    """Any sequence reward (or prefix scorer) applied to partial responses, on the top-k candidates.

    Each step, for every row's prefix y and each of the policy's k most likely next tokens v, the guide
    scores r(x, y + v): all B*k pairs in one call to the reward. Rewards with `score_ids` (value models,
    token-id tables) get token ids; text rewards get the prompt text and the decoded partial response
    (special tokens skipped) with the tokenizer given here, else the policy's (from the GuideContext).

    Args:
        reward: a SequenceReward, or any object with `score_ids(prompt_ids, completion_ids)`.
        k: candidates per step, >= 1.
        tokenizer: the tokenizer that decodes partial responses for text rewards [the policy's].
        name: a label for logs and errors.

    Example:
        >>> guide = PrefixRewardGuide(SentimentReward(), k=10)
        >>> AlignedModel(policy, tokenizer=tok, strategy=TokenwiseCD(guide, strength=1.5))
    """

    def __init__(self, reward, k: int = 10, tokenizer=None, name: str | None = None):
        super().__init__(k)
        if not (callable(getattr(reward, "score_ids", None)) or callable(getattr(reward, "score", None))):
            raise TypeError(f"reward must be a SequenceReward or have score_ids, got {type(reward).__name__}")
        self.reward = reward
        self.tokenizer = tokenizer
        self.name = name or getattr(reward, "name", type(reward).__name__)
        self.reads_text = not callable(getattr(reward, "score_ids", None))

    def start(self, context: GuideContext) -> TopKGuideState:
        state = TopKGuideState(self, context.batch, self.tokenizer or context.tokenizer)
        if self.reads_text:
            if state.tokenizer is None:
                raise ValueError(
                    f"reward {self.name!r} reads text: the policy's tokenizer is needed to decode prefixes"
                )
            if state.texts is None:
                state.texts = context.batch.prompt_texts(state.tokenizer)
        return state

    def score_candidates(self, state: TopKGuideState, candidates: torch.Tensor) -> torch.Tensor:
        rows, k = candidates.shape
        completions = [g + [v] for g, cand in zip(state.generated, candidates.tolist()) for v in cand]
        prompt_ids = [p for p in state.prompts for _ in range(k)]
        texts = None if state.texts is None else [t for t in state.texts for _ in range(k)]
        values = score_completions(self.reward, state.tokenizer, texts, completions, prompt_ids)
        return values.view(rows, k)
