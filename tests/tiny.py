"""Tiny seeded models and tokenizers built from configs: the test suite never downloads anything."""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, decoders
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

PAD, EOS, BOS = 0, 1, 2
SPECIALS = ["<pad>", "</s>", "<s>", "<|user|>", "<|assistant|>", "<|end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


def tiny_llama(vocab_size: int = 64, seed: int = 0, layers: int = 2, hidden: int = 64, heads: int = 2,
               init: float = 0.3, dtype: torch.dtype = torch.float32, **overrides) -> LlamaForCausalLM:
    """A 2-layer random Llama (head_dim 32, which vLLM's CPU backend also accepts), peaked enough that
    greedy ties are unlikely. float64 makes cached and from-scratch forwards agree to ~1e-12, so tests
    of a formula are not blurred by float32 noise in the forward pass."""
    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2),
        max_position_embeddings=256,
        initializer_range=init,
        pad_token_id=PAD,
        eos_token_id=EOS,
        bos_token_id=BOS,
        tie_word_embeddings=False,
        **overrides,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).to(dtype).eval()
    model.generation_config.pad_token_id = PAD
    model.generation_config.eos_token_id = EOS
    model.generation_config.bos_token_id = BOS
    return model


def tiny_llama64(*args, **kwargs) -> LlamaForCausalLM:
    """tiny_llama in float64: for tests that compare a formula with recomputation from scratch."""
    return tiny_llama(*args, **{"dtype": torch.float64, **kwargs})


def tiny_tokenizer(vocab_size: int = 64, name: str = "tiny-tok", shift: int = 0) -> PreTrainedTokenizerFast:
    """A word-level tokenizer: specials first, then words 'w0', 'w1', ... ('w{i+shift}' at id i, so a
    nonzero shift makes a tokenizer of the same size with different tokens)."""
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for i in range(len(SPECIALS), vocab_size):
        vocab[f"w{i - len(SPECIALS) + shift}"] = i
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        pad_token="<pad>",
        eos_token="</s>",
        bos_token="<s>",
        additional_special_tokens=SPECIALS[3:],
        name_or_path=name,
    )
    tok.chat_template = CHAT_TEMPLATE
    tok.padding_side = "left"
    return tok


def words(*ids: int) -> str:
    return " ".join(f"w{i - len(SPECIALS)}" for i in ids)
