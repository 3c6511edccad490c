"""Moved to `align_decode.serving.engines`; this module forwards to it, with a warning, until the next release."""

from .._lazy import moved_module

__getattr__ = moved_module(__name__, "align_decode.serving.engines")
