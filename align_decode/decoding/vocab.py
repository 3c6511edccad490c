"""Do two models share a vocabulary? Token-level guidance adds scores token id by token id, so a guide
must index the same tokens as the policy. Widths may differ by padding rows (a 32000-token tokenizer
with a 32001-row head): everything is cut to the policy tokenizer's length."""

from __future__ import annotations


def output_width(model) -> int:
    """Rows of the model's output head (its logits width)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and getattr(head, "weight", None) is not None:
        return int(head.weight.shape[0])
    return int(model.config.vocab_size)


def describe(tokenizer, model=None) -> str:
    name = getattr(tokenizer, "name_or_path", None) or type(tokenizer).__name__
    if model is not None and not name:
        name = getattr(model.config, "_name_or_path", "") or type(model).__name__
    return f"'{name}' ({len(tokenizer)} tokens)"


def _same_tokens(policy_tok, guide_tok) -> str | None:
    """None when every policy token has the same id in the guide tokenizer, else a short reason."""
    n = len(policy_tok)
    if len(guide_tok) < n:
        return f"the guide tokenizer has {len(guide_tok)} tokens, fewer than the policy's {n}"
    pv, gv = policy_tok.get_vocab(), guide_tok.get_vocab()
    for token, idx in pv.items():
        if idx < n and gv.get(token) != idx:
            return f"token {token!r} is id {idx} for the policy but {gv.get(token)} for the guide"
    return None


def shared_width(policy_model, policy_tok, guide_model, guide_tok, role: str = "guide") -> int:
    """The common logits width for mixing, or a ValueError naming both sides when they do not match."""
    pw, gw = output_width(policy_model), output_width(guide_model)
    if policy_tok is not None and guide_tok is not None:
        reason = _same_tokens(policy_tok, guide_tok)
        if reason is not None:
            raise ValueError(
                f"the {role} does not share the policy's tokenizer: policy {describe(policy_tok)}, "
                f"{role} {describe(guide_tok)}: {reason}"
            )
    if policy_tok is not None and (guide_tok is not None or gw == pw):
        n = len(policy_tok)
        if pw < n or gw < n:
            raise ValueError(
                f"vocabulary mismatch: the policy tokenizer has {n} tokens but the policy head has {pw} rows "
                f"and the {role} head has {gw}"
            )
        return n
    if pw != gw:
        raise ValueError(
            f"vocabulary mismatch: the policy has {pw} output tokens and the {role} has {gw}; "
            f"pass the {role}'s tokenizer too so padding rows can be told apart from a different vocabulary"
        )
    return pw
