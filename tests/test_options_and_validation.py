"""The declaration and checking of options (align_decode/options.py, validation.py, decoding/options.py):
their documented examples run, and every method's declaration is consistent with its strategy."""

from __future__ import annotations

import doctest
import inspect

import pytest

import align_decode.decoding.options as method_options
import align_decode.options as options
import align_decode.validation as validation
from align_decode.decoding import ARGS, BestOfN, BlockwiseCD, GenARM, QAlign, TokenwiseCD, TransferQ
from align_decode.validation import AT_LEAST_ONE, Bounds, check_choice


@pytest.mark.parametrize("module", [options, validation, method_options], ids=lambda m: m.__name__)
def test_documented_examples_run(module):
    result = doctest.testmod(module)
    assert result.attempted > 0 and result.failed == 0


@pytest.mark.parametrize("value", [True, "2", float("nan"), float("inf"), None, 1.5])
def test_one_rule_for_what_is_not_an_integer(value):
    with pytest.raises(ValueError, match=r"n must be an integer >= 1, got "):
        AT_LEAST_ONE.check(value, "n")


def test_ranges_describe_themselves():
    assert Bounds(gt=0, le=1).describe() == "a number in (0, 1]"
    assert Bounds(ge=0, integer=True, allow_none=True).describe() == "an integer >= 0 or None"
    assert Bounds(ge=0, integer=True, allow_none=True).describe(mention_none=False) == "an integer >= 0"
    assert Bounds(lt=2).check(1, "x") == 1.0 and isinstance(AT_LEAST_ONE.check(3, "k"), int)
    with pytest.raises(ValueError, match="mode must be one of a, b, got 'c'"):
        check_choice("c", "mode", ("a", "b"))


@pytest.mark.parametrize("strategy", [GenARM, BestOfN, QAlign, TokenwiseCD, BlockwiseCD, ARGS, TransferQ])
def test_constructor_defaults_are_the_declared_ones(strategy):
    """Each option a constructor takes has the declaration's default: stated once."""
    declared = getattr(method_options, f"{strategy.__name__}Options")
    params = inspect.signature(strategy).parameters
    for spec in declared.specs():
        assert spec.name in params, f"{strategy.__name__} does not take the declared option {spec.name}"
        assert params[spec.name].default == spec.default, (strategy.__name__, spec.name)
