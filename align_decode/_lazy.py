"""Package attributes imported on first use, so that `import align_decode` (and the command line's
`--help` and argument errors) cost no torch or transformers import."""

from __future__ import annotations

import importlib
import warnings
from typing import Callable


def lazy_exports(
    package: str, exports: dict[str, str], moved: dict[str, str] | None = None
) -> tuple[Callable[[str], object], Callable[[], list]]:
    """(__getattr__, __dir__) for a package whose public names live in submodules.

    exports maps each public name to the module (relative to the package) that defines it; moved maps
    names that now live elsewhere to their new module (absolute): they still resolve, for one release,
    with a DeprecationWarning that gives the new place.
    """
    namespace = importlib.import_module(package).__dict__
    moved = moved or {}

    def __getattr__(name: str):
        if name in moved:
            warnings.warn(f"{package}.{name} moved to {moved[name]}.{name}; the old name goes in the next release",
                          DeprecationWarning, stacklevel=2)
            return getattr(importlib.import_module(moved[name]), name)
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module, package), name)
        namespace[name] = value  # later lookups skip __getattr__
        return value

    def __dir__() -> list:
        return sorted(set(namespace) | set(exports))

    return __getattr__, __dir__


def moved_module(old: str, new: str) -> Callable[[str], object]:
    """__getattr__ for a module that moved: `old.name` resolves to `new.name`, with a DeprecationWarning, for
    one release. Nothing is imported until a name is asked for."""

    def __getattr__(name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        warnings.warn(f"{old} moved to {new}; the old module goes in the next release", DeprecationWarning,
                      stacklevel=2)
        return getattr(importlib.import_module(new), name)

    return __getattr__
