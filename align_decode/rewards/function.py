"""Any Python function as a sequence reward."""

from __future__ import annotations

import numbers
from typing import Callable, Sequence

import torch

from .base import SequenceReward


class CallableReward(SequenceReward):
    """Wraps a Python function r(x, y) as a `SequenceReward`.

    Whether the function is per-pair or batched is said explicitly with `batched`, never guessed from
    its signature: both kinds take two arguments, so only the caller knows which one it wrote.

    - ``batched=False`` (default): ``fn(prompt: str, completion: str) -> float``, called once per pair.
    - ``batched=True``: ``fn(prompts: list[str], completions: list[str]) -> [B] floats`` (a list, a
      numpy array or a tensor), called once per `score` call.

    The base class checks the result: a wrong length or a NaN raises a ValueError naming the reward.

    Args:
        fn: the function.
        batched: how `fn` is called (see above).
        name: a label for errors and logs (default: the function's __name__).

    Example:
        >>> shout = CallableReward(lambda prompt, completion: completion.count("!"))
        >>> shout.score(["Hi", "Hi"], ["Hello!", "Hey!!"])
        tensor([1., 2.])
        >>> lengths = CallableReward(lambda ps, cs: [len(c) for c in cs], batched=True)
        >>> lengths.score(["Hi"], ["Hello"])
        tensor([5.])
    """

    def __init__(self, fn: Callable, batched: bool = False, name: str | None = None):
        if not callable(fn):
            raise TypeError(f"fn must be callable, got {type(fn).__name__}")
        if not isinstance(batched, bool):
            raise TypeError(f"batched must be True or False, got {batched!r}")
        self.fn = fn
        self.batched = batched
        self.name = name or getattr(fn, "__name__", None) or type(fn).__name__

    def _score(self, prompts: Sequence[str], completions: Sequence[str]) -> torch.Tensor:
        if self.batched:
            out = self.fn(list(prompts), list(completions))
            if isinstance(out, torch.Tensor):
                return out.detach().float().cpu()
            try:
                return torch.as_tensor(out, dtype=torch.float32)
            except (TypeError, ValueError, RuntimeError) as err:
                raise TypeError(
                    f"reward {self.name!r} (batched=True) must return {len(prompts)} numbers, got {type(out).__name__}"
                    " (is it a per-pair function? then use batched=False)"
                ) from err
        values = []
        for i, (prompt, completion) in enumerate(zip(prompts, completions)):
            value = self.fn(prompt, completion)
            if isinstance(value, torch.Tensor) and value.numel() == 1:
                value = value.item()
            if not isinstance(value, numbers.Real):  # bools count, as 1.0 / 0.0
                raise TypeError(
                    f"reward {self.name!r} (batched=False) must return one number per pair; pair {i} gave "
                    f"{type(value).__name__} (is it a batched function? then use batched=True)"
                )
            values.append(float(value))
        return torch.tensor(values, dtype=torch.float32)
