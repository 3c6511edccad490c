"""Sequence rewards: the base contract, callables, and combinations (weighted sums, clamp, log-sigmoid)."""

from __future__ import annotations

import math

import pytest
import torch

from align_decode.rewards import CallableReward, Clamp, LogSigmoidTransform, SequenceReward, WeightedSum


class Table(SequenceReward):
    """A reward read from a table keyed by completion; counts its calls."""

    def __init__(self, table: dict[str, float], name: str = "table"):
        self.table = table
        self.name = name
        self.calls = 0

    def _score(self, prompts, completions):
        self.calls += 1
        return [self.table[c] for c in completions]


# ---------------------------------------------------------------- base contract


def test_base_rejects_nan_naming_reward_and_pair():
    r = CallableReward(lambda p, c: float("nan") if c == "bad" else 1.0, name="picky")
    with pytest.raises(ValueError, match=r"'picky' returned NaN for pair\(s\) \[1, 3\]"):
        r.score(["x"] * 4, ["ok", "bad", "ok", "bad"])


def test_base_rejects_wrong_shape_naming_shapes():
    r = CallableReward(lambda ps, cs: [0.0] * (len(cs) + 1), batched=True, name="off_by_one")
    with pytest.raises(ValueError, match=r"'off_by_one' returned shape \(3,\) for 2 pairs; expected \(2,\)"):
        r.score(["a", "b"], ["c", "d"])
    two_d = CallableReward(lambda ps, cs: torch.zeros(len(cs), 1), batched=True, name="col")
    with pytest.raises(ValueError, match=r"shape \(2, 1\)"):
        two_d.score(["a", "b"], ["c", "d"])


def test_base_length_mismatch_and_empty_batch():
    r = Table({"a": 1.0})
    with pytest.raises(ValueError, match="2 prompts but 1 completions"):
        r.score(["x", "y"], ["a"])
    out = r.score([], [])
    assert out.shape == (0,) and r.calls == 0


def test_score_is_float32_cpu_and_call_alias():
    r = Table({"a": 1.5, "b": -2.0})
    out = r(["x", "x"], ["a", "b"])
    assert out.dtype == torch.float32 and out.device.type == "cpu"
    assert out.tolist() == [1.5, -2.0]


# ---------------------------------------------------------------- callables


def test_callable_per_pair_sees_each_pair():
    seen = []

    def fn(prompt, completion):
        seen.append((prompt, completion))
        return len(prompt) * 10 + len(completion)

    r = CallableReward(fn)
    assert r.score(["ab", "abc"], ["x", "xyz"]).tolist() == [21.0, 33.0]
    assert seen == [("ab", "x"), ("abc", "xyz")]
    assert r.name == "fn"


def test_callable_batched_called_once_with_lists():
    calls = []

    def fn(prompts, completions):
        calls.append((prompts, completions))
        return torch.tensor([float(len(c)) for c in completions], dtype=torch.float64)

    r = CallableReward(fn, batched=True)
    assert r.score(("p", "q", "r"), ("a", "bb", "")).tolist() == [1.0, 2.0, 0.0]
    assert calls == [(["p", "q", "r"], ["a", "bb", ""])]


def test_callable_bools_and_one_element_tensors():
    r = CallableReward(lambda p, c: c == "yes")
    assert r.score(["?", "?"], ["yes", "no"]).tolist() == [1.0, 0.0]
    t = CallableReward(lambda p, c: torch.tensor([2.5]))
    assert t.score(["?"], ["!"]).tolist() == [2.5]


def test_callable_misuse_errors_point_at_batched_flag():
    # a batched function wrapped as per-pair returns a list per "pair"
    per_pair = CallableReward(lambda ps, cs: [1.0 for _ in cs], name="lens")
    with pytest.raises(TypeError, match=r"'lens' \(batched=False\).*pair 0 gave list.*batched=True"):
        per_pair.score(["ab"], ["cd"])
    batched = CallableReward(lambda ps, cs: "oops", batched=True)
    with pytest.raises(TypeError, match="batched=True"):
        batched.score(["a"], ["b"])
    with pytest.raises(TypeError, match="fn must be callable"):
        CallableReward(3.0)
    with pytest.raises(TypeError, match="batched must be True or False"):
        CallableReward(len, batched="yes")


# ---------------------------------------------------------------- weighted sums


def test_weighted_sum_hand_values_and_one_call_per_term():
    a = Table({"x": 1.0, "y": 3.0}, "a")
    b = Table({"x": -2.0, "y": 0.5}, "b")
    s = WeightedSum([(a, 2.0), (b, -4.0)])
    # x: 2*1 - 4*(-2) = 10;  y: 2*3 - 4*0.5 = 4
    assert s.score(["p", "p"], ["x", "y"]).tolist() == [10.0, 4.0]
    assert a.calls == 1 and b.calls == 1
    assert s.name == "2*a + -4*b"


def test_operator_sugar_builds_flat_weighted_sums():
    a = Table({"x": 1.0, "y": 3.0}, "a")
    b = Table({"x": -2.0, "y": 0.5}, "b")
    c = Table({"x": 7.0, "y": 0.0}, "c")
    combo = 2 * a - b * 4 + 0.5 * (c + a)
    assert isinstance(combo, WeightedSum)
    assert [(r.name, w) for r, w in combo.terms] == [("a", 2.0), ("b", -4.0), ("c", 0.5), ("a", 0.5)]
    # x: 2 + 8 + 3.5 + 0.5 = 14;  y: 6 - 2 + 0 + 1.5 = 5.5
    assert combo.score(["p", "p"], ["x", "y"]).tolist() == [14.0, 5.5]
    assert (-a).score(["p"], ["y"]).tolist() == [-3.0]
    assert sum([a, b]).score(["p"], ["x"]).tolist() == [-1.0]
    assert sum([a]) is a
    with pytest.raises(TypeError):
        a + 1.0
    with pytest.raises(TypeError):
        a * "2"


def test_weighted_sum_validation():
    a = Table({"x": 1.0})
    with pytest.raises(ValueError, match="at least one"):
        WeightedSum([])
    with pytest.raises(TypeError, match="term 0's reward must be a SequenceReward.*CallableReward"):
        WeightedSum([(len, 1.0)])
    with pytest.raises(ValueError, match="term 1's weight must be a finite number"):
        WeightedSum([(a, 1.0), (a, float("nan"))])
    with pytest.raises(TypeError, match=r"term 0 must be a \(reward, weight\) pair"):
        WeightedSum([a])


def test_clamp_bounds_and_validation():
    a = Table({"lo": -100.0, "mid": 3.0, "hi": 100.0})
    c = Clamp(a, low=-40, high=40)
    assert c.score(["p"] * 3, ["lo", "mid", "hi"]).tolist() == [-40.0, 3.0, 40.0]
    assert Clamp(a, high=0).score(["p"] * 3, ["lo", "mid", "hi"]).tolist() == [-100.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="low and/or high"):
        Clamp(a)
    with pytest.raises(ValueError, match=r"low \(2.0\) must be <= high \(1.0\)"):
        Clamp(a, low=2, high=1)


# ---------------------------------------------------------------- log-sigmoid transform


def test_logsigmoid_hand_values():
    a = Table({"zero": 0.0, "two": 2.0, "minus": -1.0})
    t = LogSigmoidTransform(a, reference={"p": 0.0, "q": 1.0})
    out = t.score(["p", "q", "q"], ["zero", "two", "minus"])
    expected = [math.log(0.5), -math.log(1 + math.exp(-1.0)), -math.log(1 + math.exp(2.0))]
    assert out.tolist() == pytest.approx(expected, abs=1e-6)
    assert t.name == "logsigmoid(table)"


def test_logsigmoid_is_stable_for_large_margins():
    a = Table({"huge": 1000.0, "tiny": -1000.0, "mid": 30.0})
    out = LogSigmoidTransform(a, reference=0.0).score(["p"] * 3, ["huge", "tiny", "mid"])
    assert torch.isfinite(out).all()
    # log sigmoid(-1000) = -1000 - log(1 + e^-1000) = -1000; log(sigmoid(.)) in floats would give -inf
    assert out[1].item() == -1000.0
    assert out[0].item() == 0.0 or -1e-30 < out[0].item() < 0.0
    assert out[2].item() == pytest.approx(-math.exp(-30.0), rel=1e-5)  # -log(1 + e^-30) ~ -e^-30, not 0
    naive = torch.log(torch.sigmoid(torch.tensor([-1000.0])))
    assert torch.isinf(naive).all()  # the naive form really does fail here


def test_fit_reference_quantile_mean_and_pooling():
    rewards = {f"s{i}": v for i, v in enumerate([1.0, 2.0, 3.0, 10.0, 5.0, -1.0])}
    a = Table(rewards)
    refs = [["s0", "s1", "s2", "s3"], "s4"]
    med = LogSigmoidTransform(a).fit_reference(["p", "q"], refs)
    # linear interpolation: median of [1, 2, 3, 10] is 2.5; one sample -> its reward
    assert med.reference == {"p": 2.5, "q": 5.0}
    assert a.calls == 1  # all reference completions scored in one batch
    q75 = LogSigmoidTransform(a, quantile=0.75).fit_reference(["p"], [refs[0]])
    assert q75.reference["p"] == pytest.approx(3 + 0.25 * 7)  # position 0.75 * 3 = 2.25
    mean = LogSigmoidTransform(a, statistic="mean").fit_reference(["p"], [refs[0]])
    assert mean.reference["p"] == pytest.approx(4.0)
    pooled = LogSigmoidTransform(a, statistic="mean").fit_reference(["p", "p"], [["s0"], ["s3", "s5"]])
    assert pooled.reference["p"] == pytest.approx((1 + 10 - 1) / 3)
    out = med.score(["p", "q"], ["s2", "s2"])
    assert out.tolist() == pytest.approx([-math.log1p(math.exp(-0.5)), -math.log1p(math.exp(2.0))], abs=1e-6)


def test_logsigmoid_unknown_prompt_and_validation():
    a = Table({"x": 1.0})
    t = LogSigmoidTransform(a, reference={"known": 0.0})
    with pytest.raises(KeyError, match="no reference level for prompt 'stranger'"):
        t.score(["known", "stranger"], ["x", "x"])
    with pytest.raises(KeyError, match="fit_reference"):
        LogSigmoidTransform(a).score(["p"], ["x"])
    with pytest.raises(ValueError, match=r"quantile must be a number in \[0, 1\], got 1.5"):
        LogSigmoidTransform(a, quantile=1.5)
    with pytest.raises(ValueError, match="statistic must be one of"):
        LogSigmoidTransform(a, statistic="max")
    with pytest.raises(ValueError, match="reference level for prompt 'p' must be a finite number"):
        LogSigmoidTransform(a, reference={"p": float("inf")})
    with pytest.raises(ValueError, match="2 prompts but 1 lists"):
        LogSigmoidTransform(a).fit_reference(["p", "q"], [["x"]])
    with pytest.raises(ValueError, match="no reference completions for prompt 'p'"):
        LogSigmoidTransform(a).fit_reference(["p"], [[]])


def test_sum_of_logsigmoids_acts_like_and():
    # candidate "both" is decent in both properties; "lopsided" is great in one and bad in the other
    helpful = Table({"both": 1.0, "lopsided": 10.0}, "helpful")
    harmless = Table({"both": 1.0, "lopsided": -3.0}, "harmless")
    plain = (helpful + harmless).score(["p", "p"], ["both", "lopsided"])
    assert plain.argmax().item() == 1  # 2 < 7: a plain sum lets one property buy off the other
    combined = LogSigmoidTransform(helpful, reference=0.0) + LogSigmoidTransform(harmless, reference=0.0)
    out = combined.score(["p", "p"], ["both", "lopsided"])
    ls = lambda z: -math.log1p(math.exp(-z))
    assert out.tolist() == pytest.approx([2 * ls(1.0), ls(10.0) + ls(-3.0)], abs=1e-6)
    assert out.argmax().item() == 0


def test_docstring_examples_run():
    import doctest

    import align_decode.rewards as rewards
    from align_decode.rewards import answers, base, constraints, function, offline

    for module in (answers, base, constraints, function, offline):
        result = doctest.testmod(module, extraglobs=vars(rewards), verbose=False)
        assert result.attempted > 0 and result.failed == 0, module.__name__


@pytest.mark.parametrize("make, message", [
    (lambda a: WeightedSum([(a, True)]), "term 0's weight must be a finite number, got True"),
    (lambda a: WeightedSum([(a, "2")]), "term 0's weight must be a finite number, got '2'"),
    (lambda a: Clamp(a, low=True), "low must be a finite number, got True"),
    (lambda a: Clamp(a, high="40"), "high must be a finite number, got '40'"),
    (lambda a: LogSigmoidTransform(a, quantile=True), r"quantile must be a number in \[0, 1\], got True"),
    (lambda a: LogSigmoidTransform(a, quantile="0.5"), r"quantile must be a number in \[0, 1\], got '0.5'"),
    (lambda a: LogSigmoidTransform(a, quantile=float("nan")), r"quantile must be a number in \[0, 1\], got nan"),
    (lambda a: LogSigmoidTransform(a, reference=True), "reference must be a finite number, got True"),
    (lambda a: LogSigmoidTransform(a, reference={"p": "1"}), "reference level for prompt 'p' must be a finite number"),
])
def test_combinators_refuse_bools_and_strings(make, message):
    with pytest.raises(ValueError, match=message):
        make(Table({"x": 1.0}))
