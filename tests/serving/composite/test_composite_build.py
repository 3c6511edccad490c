"""`align-decode build-composite` and the pieces of the composite path that need no engine."""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import pytest
import torch
from click.testing import CliRunner

from vllm_support import save_models

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    return save_models(tmp_path_factory.mktemp("build-models"))


def test_the_command_writes_a_folder_that_links_the_weights(paths, tmp_path):
    from align_decode.cli import cli

    out = tmp_path / "composite"
    res = CliRunner().invoke(cli, ["build-composite", "--policy", str(paths["policy"]), "--guide",
                                   f"helpful={paths['arm']}", "--guide", f"safety={paths['arm2']}",
                                   "--qhead", "safety", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "symlinked" in res.output and "copied" in res.output and "vllm serve" in res.output
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["AlignDecodeGuidedForCausalLM"]
    entry = cfg["align_decode"]
    assert entry["policy"] == str(paths["policy"].resolve())
    assert [(g["name"], g["kind"], g["width"]) for g in entry["guides"]] == [("helpful", "arm", 64), ("safety", "qhead", 64)]
    weights = out / "model.safetensors"
    assert weights.is_symlink() and os.path.samefile(weights, paths["policy"] / "model.safetensors")
    assert (out / "tokenizer.json").is_file() and not (out / "tokenizer.json").is_symlink()
    # Nothing but config and tokenizer files was written (weights are links).
    written = sum(f.stat().st_size for f in out.iterdir() if not f.is_symlink())
    assert written < 1 << 20

    again = CliRunner().invoke(cli, ["build-composite", "--policy", str(paths["policy"]), "--guide",
                                     f"helpful={paths['arm']}", "--out", str(out)])
    assert again.exit_code != 0 and "not empty" in again.output
    prompted = CliRunner().invoke(cli, ["build-composite", "--policy", str(paths["policy"]), "--guide",
                                        "polite=prompt:Answer politely.", "--out", str(tmp_path / "p")])
    assert prompted.exit_code != 0 and "prompted ARM" in prompted.output and "align-decode serve" in prompted.output
    assert not (tmp_path / "p").exists()


def test_refusals_say_why(paths, tmp_path):
    from align_decode.serving.composite.spec import CompositeError, build_composite, parse_guide_option
    from tiny import tiny_llama, tiny_tokenizer

    with pytest.raises(CompositeError, match="prompted ARM.*cannot be packed.*ALIGN_DECODE_GUIDES.*either"
                                             ".*align-decode serve.*arm_prompt"):
        parse_guide_option("polite=prompt:Be polite.")
    with pytest.raises(CompositeError, match="NAME=DIR"):
        parse_guide_option("just-a-folder")
    other = tmp_path / "other-tok"
    tiny_llama(seed=3).save_pretrained(other)
    tiny_tokenizer(shift=5).save_pretrained(other)
    with pytest.raises(CompositeError, match="does not share the policy's tokenizer"):
        build_composite(paths["policy"], {"x": other}, tmp_path / "out1")
    with pytest.raises(CompositeError, match="no config.json"):
        build_composite(paths["policy"], {"x": tmp_path}, tmp_path / "out2")
    built = tmp_path / "built"
    build_composite(paths["policy"], {"a": paths["arm"]}, built)
    with pytest.raises(CompositeError, match="already a composite"):
        build_composite(built, {"a": paths["arm"]}, tmp_path / "out3")


def _update(removed=(), added=(), moved=()):
    return SimpleNamespace(removed=list(removed), added=list(added), moved=list(moved))


def test_the_processor_side_mixes_handed_over_scores_by_batch_row():
    from align_decode.serving.composite import handoff
    from align_decode.serving.composite.guidance import CompositeV1Guidance
    from align_decode.serving.composite.spec import CompositeSpec, PackedGuide
    from align_decode.serving.vllm_plugin.config import RequestGuidance

    spec = CompositeSpec("/p", (PackedGuide("a", "/a", width=6), PackedGuide("b", "/b", width=5)))

    def parse(params):
        return RequestGuidance(tuple(params.w.items())) if params.w else None

    impl = CompositeV1Guidance(spec, parse, lambda p: p.c)
    P = lambda w, c=1.0: SimpleNamespace(w=w, c=c)  # noqa: E731
    impl.update_state(_update(added=[(0, P({"a": 1.0}), None, []), (1, P({}), None, []),
                                       (2, P({"a": 0.5, "b": 2.0}, c=0.5), None, [])]))
    impl.update_state(_update(added=[]))
    logits = torch.zeros(3, 6)
    ga, gb = torch.arange(18.0).view(3, 6), torch.ones(3, 5)
    handoff.publish([ga, gb])
    out = impl.apply(logits.clone())
    assert torch.equal(out[1], torch.zeros(6))  # not opted in: untouched
    assert torch.equal(out[0, :5], ga[0, :5]) and out[0, 5] == float("-inf")  # b's width is 5: column 5 is out
    assert torch.allclose(out[2, :5], 0.25 * ga[2, :5] + 1.0)
    # A swap moves the weights with the request; a removal drops them.
    impl.update_state(_update(moved=[(0, 2, SimpleNamespace(name="SWAP"))], removed=[1]))
    handoff.publish([ga, gb])
    out = impl.apply(torch.zeros(3, 6))
    assert torch.equal(out[2, :5], ga[2, :5]) and torch.allclose(out[0, :5], 0.25 * ga[0, :5] + 1.0)
    # Scores for another number of rows are refused, not mixed into the wrong rows.
    handoff.publish([ga[:2], gb[:2]])
    with pytest.raises(RuntimeError, match="rows"):
        impl.apply(torch.zeros(3, 6))
    handoff.clear()


@pytest.mark.vllm
def test_admission_in_a_front_end_process_learns_the_packed_guides(paths, tmp_path):
    """The API server's process never builds the model: the plugin hook announces the guides from the
    model config its InputProcessor is given."""
    pytest.importorskip("vllm", reason="vLLM is not installed (scripts/setup-vllm.sh)")
    from align_decode.serving.composite import handoff, register
    from align_decode.serving.composite.spec import build_composite

    register()
    from vllm.v1.engine import input_processor as ip

    assert getattr(ip.InputProcessor.__init__, "_align_decode", False)
    build_composite(paths["policy"], {"zeta-guide": paths["arm"]}, tmp_path / "c")
    from transformers import AutoConfig

    cfg = SimpleNamespace(model_config=SimpleNamespace(hf_config=AutoConfig.from_pretrained(tmp_path / "c")))
    with pytest.raises(Exception):  # the stand-in config is not a real VllmConfig; the hook runs first
        ip.InputProcessor(cfg)
    assert "zeta-guide" in handoff.known_guides()


def test_idle_steps_skip_the_guides_only_when_it_is_safe(monkeypatch):
    """The per-step switch: off while a guided row is in the batch, and for good once a request arrives
    that was not stamped (and salted) at admission by the processor's own rule."""
    from align_decode.serving.composite import handoff
    from align_decode.serving.composite.guidance import (IDLE_SKIP_ENV, CompositeV1Guidance, OptInRule, idle_skip,
                                                         stamp_request)
    from align_decode.serving.composite.spec import CompositeSpec, PackedGuide
    from align_decode.serving.vllm_plugin.config import GuideConfig

    def engine(caching=True, full=False, kv=None):
        return SimpleNamespace(cache_config=SimpleNamespace(enable_prefix_caching=caching), kv_transfer_config=kv,
                               compilation_config=SimpleNamespace(cudagraph_mode=SimpleNamespace(has_full_cudagraphs=lambda: full)))

    assert idle_skip(engine())[:2] == (True, True)
    assert idle_skip(engine(caching=False))[:2] == (True, False)
    assert idle_skip(engine(full=True))[0] is False and idle_skip(engine(kv=object()))[0] is False
    monkeypatch.setenv(IDLE_SKIP_ENV, "0")
    assert idle_skip(engine())[0] is False
    monkeypatch.delenv(IDLE_SKIP_ENV)

    spec = CompositeSpec("/p", (PackedGuide("a", "/a", width=6),))
    rule = OptInRule(["a"], GuideConfig())
    impl = CompositeV1Guidance(spec, rule.guidance, lambda p: 1.0, skip=(True, True), fingerprint=rule.fingerprint)
    assert impl.skip and handoff.guides_needed()  # until the first batch says otherwise (profiling runs)

    def admitted(guides, salt=None):  # a request as the engine core's admission hook leaves it
        request = SimpleNamespace(sampling_params=SimpleNamespace(extra_args={"align_decode": {"guides": guides}}),
                                  cache_salt=salt)
        stamp_request(rule, request)
        return request

    plain, guided, user = admitted({}), admitted({"a": 1.0}), admitted({"a": 0.5}, salt="user")
    assert (plain.cache_salt, guided.cache_salt, user.cache_salt) == (None, handoff.SALT, "user" + handoff.SALT)
    impl.update_state(_update(added=[(0, plain.sampling_params, None, [])]))
    assert not handoff.guides_needed()
    impl.update_state(_update(added=[(1, guided.sampling_params, None, [])]))
    assert handoff.guides_needed()
    impl.update_state(_update(removed=[1]))
    assert not handoff.guides_needed()
    impl.update_state(None)
    assert not handoff.guides_needed()
    # Stamped by another rule (another engine's guides or configuration), or not at all: skipping
    # stops for good.
    other = OptInRule(["a", "b"], GuideConfig())
    stranger = SimpleNamespace(sampling_params=SimpleNamespace(extra_args=None), cache_salt=None)
    stamp_request(other, stranger)
    impl.update_state(_update(added=[(1, stranger.sampling_params, None, [])]))
    assert handoff.guides_needed() and not impl.skip
    impl.update_state(_update(removed=[0, 1]))
    assert handoff.guides_needed()
    # Without skipping allowed (or without a rule to check stamps against) the guides always run.
    for never in (CompositeV1Guidance(spec, rule.guidance, lambda p: 1.0),
                  CompositeV1Guidance(spec, rule.guidance, lambda p: 1.0, skip=(True, True))):
        never.update_state(_update(added=[(0, plain.sampling_params, None, [])]))
        assert handoff.guides_needed()


@pytest.mark.vllm
def test_the_engine_core_hook_stamps_requests_of_composite_engines_only(paths, tmp_path):
    pytest.importorskip("vllm", reason="vLLM is not installed (scripts/setup-vllm.sh)")
    from transformers import AutoConfig
    from vllm import SamplingParams
    from vllm.v1.engine import core

    from align_decode.serving.composite import handoff, register
    from align_decode.serving.composite.spec import build_composite

    register()
    hook = core.EngineCore.preprocess_add_request
    assert getattr(hook, "_align_decode", False)
    build_composite(paths["policy"], {"a": paths["arm"]}, tmp_path / "c")

    def admit(folder, extra):
        engine = SimpleNamespace(vllm_config=SimpleNamespace(model_config=SimpleNamespace(
            hf_config=AutoConfig.from_pretrained(folder))))
        request = SimpleNamespace(sampling_params=SamplingParams(max_tokens=1, extra_args=extra), cache_salt=None)
        with pytest.raises(Exception):  # the stand-in engine has nothing else: the original fails after the hook
            hook(engine, request)
        return request

    g = admit(tmp_path / "c", {"align_decode": '{"guides": {"a": 1.0}}'})
    assert g.cache_salt == handoff.SALT and g.sampling_params.extra_args[handoff.MARK].endswith(":1")
    p = admit(tmp_path / "c", None)
    assert p.cache_salt is None and p.sampling_params.extra_args[handoff.MARK].endswith(":0")
    other = admit(paths["policy"], {"align_decode": '{"guides": {"a": 1.0}}'})  # not a composite model
    assert other.cache_salt is None and handoff.MARK not in other.sampling_params.extra_args
