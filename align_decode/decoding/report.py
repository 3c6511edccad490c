"""What a sequence-level method reports about one call, typed.

Best-of-N, QAlign, blockwise CD and Transfer Q* return their candidates, chain traces and accounting as a
dataclass of their own (`BestOfNReport`, `QAlignReport`, ...) in `Decoded.extras`: the command line and
other callers read attributes, not string keys. A report is also a read-only mapping of its fields, so
`AlignedModel.generate(...).alignment` stays a plain dict of them (`out.alignment["rewards"]`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, Iterator


@dataclass
class Report(Mapping):
    """Base of the method reports: a dataclass that reads as a mapping of its fields."""

    def __getitem__(self, key: str) -> Any:
        if key not in self._names():
            raise KeyError(key)
        return getattr(self, key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names())

    def __len__(self) -> int:
        return len(self._names())

    @classmethod
    def _names(cls) -> list[str]:
        return [f.name for f in fields(cls)]
