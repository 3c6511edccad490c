"""A transformers sequence-classification model (a reward model) as a sequence reward."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from ..errors import AlignDecodeWarning
from ..validation import AT_LEAST_ONE, Bounds, check_choice
from .base import SequenceReward

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


def _resolve_dtype(dtype) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str) and dtype in _DTYPES:
        return _DTYPES[dtype]
    raise ValueError(f"dtype must be a torch.dtype, one of {sorted(_DTYPES)} or None, got {dtype!r}")


def _local_folder(path, what: str) -> Path:
    path = Path(path).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(
            f"ClassifierReward loads {what} only from a local folder (it never downloads); "
            f"{str(path)!r} is not a directory"
        )
    return path


class ClassifierReward(SequenceReward):
    """A reward model with a classification head (`AutoModelForSequenceClassification`) scoring text.

        r(x, y) = head( model( format(x, y) ) )

    Formatting: with a chat template the pair is rendered as the conversation
    [user: x, assistant: y] (the template's own special tokens, no generation prompt); without one the
    text is x + separator + y. The reward model uses its own tokenizer, so it may differ from the
    policy's.

    Head: transformers pools the logits at the last token that is not the config's pad_token_id. For
    one label the reward is that logit ("logit"), sigmoid(logit) ("prob") or log sigmoid(logit)
    ("log_prob"); for several labels pick one with `label` (an index or a name from config.label2id)
    and get its logit, softmax probability or log-softmax.

    Truncation to `max_length` tokens drops the oldest tokens first: the prompt is cut from its left
    (whole tokens, re-rendered through the template, so the template's markers stay), and only if the
    completion alone does not fit is the encoded sequence itself cut, keeping its end
    (truncation_side="left", the default: the token the head reads is the real end of the text) or its
    beginning ("right").

    Padding: rows are right-padded with the model config's pad_token_id, which is what transformers uses
    to find the last real token, so a padded batch gives the same scores as one row at a time. If the
    config has none, the tokenizer's pad token (else its EOS) is written into the model config, as
    reward trainers do; a row whose real text ends in that token is then pooled at the token before it.

    Args:
        model: a sequence-classification model, or a local folder to load it from (never the Hub).
        tokenizer: its tokenizer, or a local folder; defaults to the model's folder when model is a path.
        chat_template: None (use the tokenizer's chat template if it has one), True (require it),
            False (plain text), or a Jinja template string.
        separator: between prompt and completion when not using a chat template (default "").
        max_length: token budget per pair (>= 1); None uses the smaller of the tokenizer's
            model_max_length and the model's max_position_embeddings, when known.
        truncation_side: "left" or "right", for a completion that alone exceeds max_length.
        batch_size: pairs per forward pass (>= 1). Pairs are sorted by length to pad little.
        device: where to run (the model is moved there); None keeps the model's device.
        dtype: model dtype (e.g. torch.bfloat16 or "bfloat16"); None keeps it / loads the checkpoint's.
        label: which output label is the reward, for models with several labels.
        reduction: "logit" (default), "prob" or "log_prob".
        add_special_tokens: whether the tokenizer adds BOS/EOS around the text; default False with a
            chat template (templates write their own) and True without.

    Example:
        >>> rm = ClassifierReward("/models/my-rm", max_length=1024, batch_size=16, dtype="bfloat16")
        >>> rm.score(["How do I boil an egg?"], ["Put it in boiling water for 8 minutes."])
        tensor([1.7031])
    """

    REDUCTIONS = ("logit", "prob", "log_prob")

    def __init__(self, model, tokenizer=None, *, chat_template: bool | str | None = None, separator: str = "",
                 max_length: int | None = None, truncation_side: str = "left", batch_size: int = 8, device=None,
                 dtype=None, label: int | str | None = None, reduction: str = "logit",
                 add_special_tokens: bool | None = None, name: str | None = None):
        dtype = _resolve_dtype(dtype)
        if isinstance(model, (str, os.PathLike)):
            from transformers import AutoModelForSequenceClassification

            folder = _local_folder(model, "the model")
            kwargs = {"local_files_only": True}
            if dtype is not None:
                kwargs["dtype"] = dtype
            model_obj = AutoModelForSequenceClassification.from_pretrained(str(folder), **kwargs)
            if tokenizer is None:
                tokenizer = folder
        else:
            if not (hasattr(model, "config") and callable(model)):
                raise TypeError(f"model must be a transformers model or a local folder, got {type(model).__name__}")
            model_obj = model
        if tokenizer is None:
            raise ValueError("tokenizer is required when model is a model object (pass the reward model's tokenizer)")
        if isinstance(tokenizer, (str, os.PathLike)):
            from transformers import AutoTokenizer

            folder = _local_folder(tokenizer, "the tokenizer")
            tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        if not callable(tokenizer):
            raise TypeError(
                f"tokenizer must be a transformers tokenizer or a local folder, got {type(tokenizer).__name__}"
            )

        AT_LEAST_ONE.check(batch_size, "batch_size")
        Bounds(ge=1, integer=True, allow_none=True).check(max_length, "max_length")
        check_choice(truncation_side, "truncation_side", ("left", "right"))
        check_choice(reduction, "reduction", self.REDUCTIONS)
        if not isinstance(separator, str):
            raise TypeError(f"separator must be a str, got {type(separator).__name__}")

        if chat_template is None:
            template = getattr(tokenizer, "chat_template", None) or None
        elif chat_template is True:
            template = getattr(tokenizer, "chat_template", None)
            if not template:
                raise ValueError(
                    "chat_template=True but the tokenizer has no chat template; "
                    "pass a template string or chat_template=False"
                )
        elif chat_template is False:
            template = None
        elif isinstance(chat_template, str) and chat_template:
            template = chat_template
        else:
            raise ValueError(f"chat_template must be None, True, False or a template string, got {chat_template!r}")
        self.chat_template: str | None = template
        self.add_special_tokens = (template is None) if add_special_tokens is None else bool(add_special_tokens)

        if device is not None:
            model_obj = model_obj.to(torch.device(device))
        if dtype is not None:
            model_obj = model_obj.to(dtype)
        self.model = model_obj.eval()
        self.tokenizer = tokenizer
        self.separator = separator
        self.truncation_side = truncation_side
        self.batch_size = batch_size
        self.reduction = reduction
        self.name = name or getattr(self.model.config, "_name_or_path", "") or type(self.model).__name__

        config = self.model.config
        num_labels = int(getattr(config, "num_labels", 1))
        self.label_index = self._label_index(label, num_labels, getattr(config, "label2id", None) or {})
        self.num_labels = num_labels
        self.max_length = max_length if max_length is not None else self._default_max_length()
        self.pad_token_id = self._pad_token_id()
        self.tokens_scored = 0  # real (unpadded) tokens through the model, for cost accounting

    @staticmethod
    def _label_index(label, num_labels: int, label2id: dict) -> int:
        if label is None:
            if num_labels != 1:
                raise ValueError(
                    f"the model has {num_labels} labels: say which is the reward with label= "
                    f"(an index in [0, {num_labels - 1}] or one of {sorted(label2id)})"
                )
            return 0
        if isinstance(label, str):
            if label not in label2id:
                raise ValueError(f"label {label!r} is not in the model's label2id {sorted(label2id)}")
            return int(label2id[label])
        if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < num_labels:
            raise ValueError(f"label must be an index in [0, {num_labels - 1}] or a label name, got {label!r}")
        return label

    def _default_max_length(self) -> int | None:
        limits = []
        tok_max = getattr(self.tokenizer, "model_max_length", None)
        if isinstance(tok_max, int) and tok_max < 10**8:  # transformers uses a huge sentinel for "unknown"
            limits.append(tok_max)
        pos_max = getattr(self.model.config.get_text_config(), "max_position_embeddings", None)
        if isinstance(pos_max, int) and pos_max > 0:
            limits.append(pos_max)
        return min(limits) if limits else None

    def _pad_token_id(self) -> int:
        text_config = self.model.config.get_text_config()
        pad = getattr(text_config, "pad_token_id", None)
        if pad is not None:
            return int(pad)
        pad = self.tokenizer.pad_token_id
        if pad is None:
            pad = self.tokenizer.eos_token_id
        if pad is None:
            pad = getattr(text_config, "eos_token_id", None)
            if isinstance(pad, (list, tuple)):
                pad = pad[0] if pad else None
        if pad is None:
            raise ValueError(
                "the reward model config has no pad_token_id and the tokenizer has no pad or EOS token to use"
            )
        warnings.warn(
            f"reward model config has no pad_token_id; using {int(pad)} and writing it into the model config "
            "(transformers needs it to find the last token of padded rows)",
            AlignDecodeWarning,
            stacklevel=3,
        )
        text_config.pad_token_id = int(pad)
        self.model.config.pad_token_id = int(pad)
        return int(pad)

    def format(self, prompt: str, completion: str) -> str:
        """The text the reward model reads for one pair (before truncation)."""
        if self.chat_template is None:
            return prompt + self.separator + completion
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
        return self.tokenizer.apply_chat_template(
            messages, chat_template=self.chat_template, tokenize=False, add_generation_prompt=False
        )

    def _ids(self, prompt: str, completion: str) -> list[int]:
        text = self.format(prompt, completion)
        return list(self.tokenizer(text, add_special_tokens=self.add_special_tokens)["input_ids"])

    def _prompt_suffix(self, prompt: str, keep: int) -> str:
        """The prompt text from its keep-th token from the end (whole tokens, original characters)."""
        if keep <= 0:
            return ""
        try:
            enc = self.tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)
            return prompt[enc["offset_mapping"][-keep][0] :]
        except (NotImplementedError, KeyError, TypeError):
            # slow tokenizers have no offsets: decode the kept tokens instead
            ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
            return self.tokenizer.decode(ids[-keep:])

    def encode(self, prompt: str, completion: str) -> list[int]:
        """The token ids scored for one pair, truncated to max_length as described in the class docstring."""
        ids = self._ids(prompt, completion)
        limit = self.max_length
        if limit is None or len(ids) <= limit:
            return ids
        keep = len(self.tokenizer(prompt, add_special_tokens=False)["input_ids"])
        # Token counts of a re-rendered text are not additive, so shrink and re-check; `keep` falls
        # by at least one each round, so this ends.
        while keep > 0:
            keep = max(0, keep - (len(ids) - limit))
            ids = self._ids(self._prompt_suffix(prompt, keep), completion)
            if len(ids) <= limit:
                return ids
        return ids[-limit:] if self.truncation_side == "left" else ids[:limit]

    def _device(self) -> torch.device:
        try:
            return next(self.model.parameters()).device
        except StopIteration:
            return torch.device("cpu")

    def _head(self, logits: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        if self.num_labels == 1:
            z = logits[:, 0]
            if self.reduction == "prob":
                return torch.sigmoid(z)
            if self.reduction == "log_prob":
                return F.logsigmoid(z)
            return z
        if self.reduction == "prob":
            return logits.softmax(-1)[:, self.label_index]
        if self.reduction == "log_prob":
            return logits.log_softmax(-1)[:, self.label_index]
        return logits[:, self.label_index]

    def _score(self, prompts: Sequence[str], completions: Sequence[str]) -> torch.Tensor:
        rows = [self.encode(p, c) for p, c in zip(prompts, completions)]
        for i, row in enumerate(rows):
            if not row:
                raise ValueError(f"reward {self.name!r}: pair {i} encodes to no tokens (empty prompt and completion?)")
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
        out = torch.empty(len(rows), dtype=torch.float32)
        device = self._device()
        with torch.inference_mode():
            for start in range(0, len(order), self.batch_size):
                chunk = order[start : start + self.batch_size]
                width = max(len(rows[i]) for i in chunk)
                ids = torch.full((len(chunk), width), self.pad_token_id, dtype=torch.long)
                mask = torch.zeros((len(chunk), width), dtype=torch.long)
                for j, i in enumerate(chunk):
                    # right padding keeps positions 0..n-1 for the real tokens, as when scored alone
                    ids[j, : len(rows[i])] = torch.tensor(rows[i], dtype=torch.long)
                    mask[j, : len(rows[i])] = 1
                logits = self.model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
                out[torch.tensor(chunk)] = self._head(logits).cpu()
                self.tokens_scored += int(mask.sum())
        return out
