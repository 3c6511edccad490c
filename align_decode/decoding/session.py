"""A causal LM's decoding state for a batch of rows: the KV cache and which cached columns each row sees.

The cache is laid out physically as columns [B, L]. A boolean mask says which columns belong to each
row's sequence; a row's logical sequence is its valid columns in physical order. This one mechanism
gives every method what it needs without recomputing kept tokens:

- left padding of prompts of different lengths (leading invalid columns);
- finished rows that stop advancing (the columns fed after they finish are invalid);
- forking a prefix into many rows (select with repeated indices: best-of-N, rollouts, blocks);
- cutting rows back to different prefix lengths (QAlign suffix resampling) by invalidating columns;
- merging rows of two sessions (QAlign keeps accepted proposals and rejected old states);
- compacting away invalid columns when they pile up (a gather, no forward pass).

Positions are logical (count of valid tokens before), so a row's attention and RoPE positions are
exactly those of its sequence computed from scratch.
"""

from __future__ import annotations

import inspect

import torch

from ..transformers_compat import forward_with_cache

_MODELS_WITH_LOGITS_TO_KEEP: dict[type, bool] = {}


def _accepts_logits_to_keep(model) -> bool:
    cls = type(model)
    if cls not in _MODELS_WITH_LOGITS_TO_KEEP:
        _MODELS_WITH_LOGITS_TO_KEEP[cls] = "logits_to_keep" in inspect.signature(model.forward).parameters
    return _MODELS_WITH_LOGITS_TO_KEEP[cls]


def _has_sliding_window(model) -> bool:
    cfg = model.config
    return bool(getattr(cfg, "sliding_window", None)) or "sliding_attention" in (getattr(cfg, "layer_types", None) or ())


def _new_cache(model):
    from transformers.cache_utils import DynamicCache

    if _has_sliding_window(model):
        # Full-length layers: rows can then be forked, cut and merged like any other; the model's
        # sliding-window mask still limits what each token attends to.
        return DynamicCache()
    return DynamicCache(config=model.config)


class ModelSession:
    """Decoding state of one causal LM over a batch of rows.

    Example:
        >>> session = ModelSession(model, vocab_size=len(tokenizer))
        >>> logits = session.prefill(input_ids, attention_mask)      # [B, V] next-token logits
        >>> logits = session.step(next_tokens)                       # feed one token per row
    """

    def __init__(self, model, vocab_size: int | None = None):
        self.model = model
        self.vocab_size = vocab_size
        self.sliding = _has_sliding_window(model)
        self.cache = None
        self.ids: torch.Tensor | None = None  # [B, L] token id in each physical column
        self.mask: torch.Tensor | None = None  # [B, L] bool: column belongs to the row's sequence
        self.next_pos: torch.Tensor | None = None  # [B] logical length = position of the next token
        self.prompt_len: torch.Tensor | None = None  # [B] valid prompt tokens per row
        self.forward_tokens = 0  # token positions run through the model (for compute accounting)

    # ----------------------------------------------------------------------------------------- shape
    @property
    def batch_size(self) -> int:
        return 0 if self.mask is None else self.mask.shape[0]

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def response_lengths(self) -> torch.Tensor:
        return self.next_pos - self.prompt_len

    # --------------------------------------------------------------------------------------- forward
    def _forward(self, ids: torch.Tensor, positions: torch.Tensor, all_logits: bool) -> torch.Tensor:
        kwargs = {}
        if not all_logits and _accepts_logits_to_keep(self.model):
            kwargs["logits_to_keep"] = 1
        out, self.cache = forward_with_cache(
            self.model, self.cache, input_ids=ids, attention_mask=self.mask.long(), position_ids=positions, **kwargs
        )
        self.forward_tokens += ids.numel()
        logits = out.logits if all_logits else out.logits[:, -1]
        if self.vocab_size is not None:
            logits = logits[..., : self.vocab_size]
        return logits.float()

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, all_logits: bool = False):
        """Run the prompts (left padded, attention_mask 0 on padding); return next-token logits [B, V]
        (or every position's logits [B, L, V] with all_logits)."""
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [batch, length], got shape {tuple(input_ids.shape)}")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask shape {tuple(attention_mask.shape)} does not match input_ids {tuple(input_ids.shape)}"
            )
        device = self.device
        self.ids = input_ids.to(device)
        self.mask = attention_mask.to(device).bool()
        lengths = self.mask.sum(-1)
        if bool((lengths == 0).any()):
            empty = (lengths == 0).nonzero().flatten().tolist()
            raise ValueError(f"empty prompt in row(s) {empty}: every prompt needs at least one token")
        positions = (self.mask.long().cumsum(-1) - 1).masked_fill(~self.mask, 1)
        self.next_pos = lengths
        self.prompt_len = lengths.clone()
        self.cache = _new_cache(self.model)
        return self._forward(self.ids, positions, all_logits)

    @torch.no_grad()
    def step(self, tokens: torch.Tensor, advance: torch.Tensor | None = None, all_logits: bool = False):
        """Feed tokens [B] (or [B, t]) to every row; rows with advance=False take no token (the column
        they are fed is invalid). Returns the next-token logits [B, V]."""
        if tokens.ndim == 1:
            tokens = tokens.unsqueeze(-1)
        t = tokens.shape[1]
        new_valid = torch.ones_like(tokens, dtype=torch.bool)
        if advance is not None:
            new_valid &= advance.unsqueeze(-1)
        positions = self.next_pos.unsqueeze(-1) + torch.arange(t, device=tokens.device)
        self.ids = torch.cat([self.ids, tokens], dim=1)
        self.mask = torch.cat([self.mask, new_valid], dim=1)
        self.next_pos = self.next_pos + new_valid.sum(-1)
        return self._forward(tokens, positions, all_logits)

    # ----------------------------------------------------------------------------- row bookkeeping
    def select(self, index: torch.Tensor) -> None:
        """Keep rows by index; repeated indices fork a row (its cache is copied)."""
        index = index.to(self.mask.device)
        self.cache.batch_select_indices(index)
        self.ids, self.mask = self.ids[index], self.mask[index]
        self.next_pos, self.prompt_len = self.next_pos[index], self.prompt_len[index]

    def fork(self, index: torch.Tensor) -> "ModelSession":
        """A new session whose rows are copies of this session's rows at `index`; this one is unchanged."""
        index = index.to(self.mask.device)
        other = ModelSession(self.model, self.vocab_size)
        other.cache = _new_cache(self.model)
        for layer_idx, layer in enumerate(_layers(self.cache)):
            other.cache.update(layer.keys[index], layer.values[index], layer_idx)
        other.ids, other.mask = self.ids[index], self.mask[index]
        other.next_pos, other.prompt_len = self.next_pos[index], self.prompt_len[index]
        return other

    @classmethod
    def concat(cls, sessions: list["ModelSession"]) -> "ModelSession":
        """One session holding the rows of several sessions of the same model, in order. Shorter caches
        get invalid columns in front, so every row keeps exactly its own sequence."""
        if not sessions:
            raise ValueError("concat needs at least one session")
        first = sessions[0]
        width = max(s.mask.shape[1] for s in sessions)
        out = cls(first.model, first.vocab_size)
        out.cache = _new_cache(first.model)
        per_layer = [_layers(s.cache) for s in sessions]
        for layer_idx in range(len(per_layer[0])):
            keys, values = [], []
            for layers, s in zip(per_layer, sessions):
                k, v = layers[layer_idx].keys, layers[layer_idx].values
                gap = width - s.mask.shape[1]
                keys.append(torch.nn.functional.pad(k, (0, 0, gap, 0)))
                values.append(torch.nn.functional.pad(v, (0, 0, gap, 0)))
            out.cache.update(torch.cat(keys), torch.cat(values), layer_idx)
        out.ids = torch.cat([torch.nn.functional.pad(s.ids, (width - s.ids.shape[1], 0)) for s in sessions])
        out.mask = torch.cat([torch.nn.functional.pad(s.mask, (width - s.mask.shape[1], 0)) for s in sessions])
        out.next_pos = torch.cat([s.next_pos for s in sessions])
        out.prompt_len = torch.cat([s.prompt_len for s in sessions])
        out.forward_tokens = sum(s.forward_tokens for s in sessions)
        return out

    def logical_positions(self) -> torch.Tensor:
        """[B, L] logical index of each column in its row's sequence (meaningful where mask is set)."""
        return self.mask.long().cumsum(-1) - 1

    def keep_prefix(self, lengths: torch.Tensor, compact: bool = True) -> None:
        """Cut each row back to its first lengths[b] tokens (prompt included) by invalidating columns;
        the cache is compacted when cut columns pile up (unless compact=False)."""
        lengths = lengths.to(self.mask.device)
        if bool((lengths < 0).any()) or bool((lengths > self.next_pos).any()):
            raise ValueError("keep_prefix lengths must be between 0 and each row's current length")
        self.mask = self.mask & (self.logical_positions() < lengths.unsqueeze(-1))
        self.next_pos = lengths.clone()
        if self.sliding:
            # A sliding window is measured in cache columns: close the gaps so columns and positions agree.
            self.compact()
        elif compact:
            self.maybe_compact()

    def absorb(self, other: "ModelSession") -> None:
        """Take over another session's rows and cache (same model), in place."""
        if other.model is not self.model:
            raise ValueError("absorb needs a session of the same model")
        self.__dict__.update(other.__dict__)

    @classmethod
    def merge_rows(cls, first: "ModelSession", second: "ModelSession", take_second: torch.Tensor) -> "ModelSession":
        """Row b from `second` where take_second[b], else from `first` (same batch size and model)."""
        take = take_second.to(first.mask.device)
        if first.batch_size != second.batch_size or take.shape != (first.batch_size,):
            raise ValueError("merge_rows needs two sessions of the same batch size and one flag per row")
        if not bool(take.any()):
            return first
        if bool(take.all()):
            return second
        a, b = (~take).nonzero().flatten(), take.nonzero().flatten()
        merged = cls.concat([first.fork(a), second.fork(b)])
        merged.select(torch.argsort(torch.cat([a, b])))
        return merged

    def tokens_at(self, logical: torch.Tensor) -> torch.Tensor:
        """The token at logical position logical[b] of each row."""
        hit = self.mask & (self.logical_positions() == logical.unsqueeze(-1))
        return (self.ids * hit).sum(-1)

    @torch.no_grad()
    def resume_at(self, lengths: torch.Tensor, compact: bool = True) -> torch.Tensor:
        """Cut rows to their first lengths[b] tokens and return the logits for the next token.

        The logits at an old position are not kept, so the last kept token is fed once more: one token
        per row is recomputed, none of the rest of the prefix."""
        if bool((lengths < 1).any()):
            raise ValueError("resume_at needs at least one kept token per row")
        last = self.tokens_at(lengths - 1)
        self.keep_prefix(lengths - 1, compact=compact)
        return self.step(last)

    def sequences(self) -> list[torch.Tensor]:
        """Each row's logical token sequence (prompt and response)."""
        return [self.ids[b][self.mask[b]] for b in range(self.batch_size)]

    def maybe_compact(self, slack: float = 2.0) -> None:
        """Drop invalid columns when the cache is more than `slack` times the longest row."""
        longest = int(self.next_pos.max())
        if self.mask.shape[1] > slack * longest + 16:
            self.compact()

    def compact(self) -> None:
        """Gather each row's valid columns to the right end (left padding); no forward pass."""
        count = self.mask.sum(-1)
        width = int(count.max())
        # Sort columns so valid ones come last, keeping their order: key = valid * L + column.
        cols = torch.arange(self.mask.shape[1], device=self.mask.device)
        key = self.mask.long() * self.mask.shape[1] + cols
        order = key.argsort(dim=-1)[:, -width:]
        new_mask = torch.arange(width, device=self.mask.device) >= (width - count).unsqueeze(-1)
        _gather_cache_columns(self.cache, order)
        self.ids = self.ids.gather(1, order)
        self.mask = new_mask


def _layers(cache):
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise TypeError(f"{type(cache).__name__} is not a layered transformers cache")
    for layer in layers:
        if not hasattr(layer, "keys") or getattr(layer, "is_sliding", False):
            raise TypeError(
                f"cache layer {type(layer).__name__} is not supported for forking or cutting rows: "
                "align-decode needs full-attention key/value caches"
            )
    return layers


def _gather_cache_columns(cache, order: torch.Tensor) -> None:
    for layer in _layers(cache):
        if layer.keys is None or layer.keys.numel() == 0:
            continue
        b, h, _, d = layer.keys.shape
        idx = order.to(layer.keys.device)[:, None, :, None].expand(b, h, order.shape[1], d)
        layer.keys = layer.keys.gather(2, idx)
        dv = layer.values.shape[-1]
        layer.values = layer.values.gather(2, idx[..., :1].expand(b, h, order.shape[1], dv))
