"""The vLLM plugin's configuration and request parsing (plain Python: runs without vLLM)."""

import json
import subprocess
import sys

import pytest

from align_decode.serving.vllm_plugin import config as cfg
from align_decode.serving.vllm_plugin.config import (
    GuidanceConfigError,
    GuideConfig,
    guide_config,
    parse_request,
)


def test_importing_align_decode_and_the_plugin_config_does_not_import_vllm():
    # In a fresh interpreter: other tests in this process may have imported vLLM themselves.
    code = ("import sys, align_decode, align_decode.decoding, align_decode.serving.vllm_plugin; "
            "from align_decode.serving.vllm_plugin import batch, bank, v1, v2; "
            "print(sorted(m for m in sys.modules if m == 'vllm' or m.startswith('vllm.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_inline_json_with_defaults_and_shorthand():
    c = GuideConfig.from_value(json.dumps({"helpful": {"path": "/m/a"}, "q": {"path": "/m/q", "kind": "qhead",
                                                                               "dtype": "bfloat16", "device": "cuda:1"},
                                           "short": "/m/s"}))
    assert c.names() == ["helpful", "q", "short"]
    assert c.guides["helpful"].kind == "arm" and c.guides["helpful"].dtype == "float32"
    assert c.guides["helpful"].device is None
    assert (c.guides["q"].kind, c.guides["q"].dtype, c.guides["q"].device) == ("qhead", "bfloat16", "cuda:1")
    assert c.guides["short"].path == "/m/s"


def test_empty_or_unset_means_no_guides():
    assert not GuideConfig.from_value(None)
    assert not GuideConfig.from_value("  ")


def test_json_and_toml_files(tmp_path):
    j = tmp_path / "g.json"
    j.write_text(json.dumps({"a": {"path": "/m/a"}}))
    assert GuideConfig.from_value(str(j)).names() == ["a"]
    t = tmp_path / "g.toml"
    t.write_text('[guides.helpful]\npath = "/m/h"\nkind = "arm"\n\n[guides.safe]\npath = "/m/s"\nkind = "qhead"\n')
    c = GuideConfig.from_value(str(t))
    assert c.names() == ["helpful", "safe"] and c.guides["safe"].kind == "qhead"


@pytest.mark.parametrize(
    "value, message",
    [
        ("{not json", "not valid JSON"),
        ("/no/such/file.json", "neither a JSON object nor the path"),
        (json.dumps({"a": {"kind": "arm"}}), "needs a 'path'"),
        (json.dumps({"a": {"path": "/m", "kind": "reward"}}), "kind must be one of"),
        (json.dumps({"a": {"path": "/m", "dtype": "int8"}}), "dtype must be one of"),
        (json.dumps({"a": {"path": "/m", "weights": 1}}), "unknown field"),
        (json.dumps({"a": 3}), "must be an object"),
        (json.dumps(["a"]), "neither a JSON object"),
        (json.dumps({"a": {"path": "/m", "trust_remote_code": "yes"}}), "true or false"),
    ],
)
def test_malformed_server_config_is_refused_with_a_clear_message(value, message):
    with pytest.raises(GuidanceConfigError, match=message):
        GuideConfig.from_value(value)


def test_guide_config_reads_the_environment_and_caches_errors(monkeypatch):
    monkeypatch.setenv(cfg.ENV_VAR, json.dumps({"x": {"path": "/m"}}))
    assert guide_config().names() == ["x"]
    monkeypatch.setenv(cfg.ENV_VAR, "{broken")
    for _ in range(2):
        with pytest.raises(GuidanceConfigError):
            guide_config()
    monkeypatch.delenv(cfg.ENV_VAR)
    assert not guide_config()


CONFIG = GuideConfig.from_value(json.dumps({"helpful": "/m/h", "harmless": "/m/s"}))


def test_requests_without_the_key_do_not_opt_in():
    assert parse_request(None, CONFIG) is None
    assert parse_request({}, CONFIG) is None
    assert parse_request({"other_plugin": 1}, CONFIG) is None


def test_request_weights_dict_and_json_string_forms():
    a = parse_request({"align_decode": {"guides": {"helpful": 1.0, "harmless": 0.5}}}, CONFIG)
    b = parse_request({"align_decode": json.dumps({"guides": {"helpful": 1, "harmless": 0.5}})}, CONFIG)
    assert a == b and dict(a.weights) == {"helpful": 1.0, "harmless": 0.5}


def test_zero_weights_are_dropped_and_an_empty_request_is_unguided():
    r = parse_request({"align_decode": {"guides": {"helpful": 0.0, "harmless": -2}}}, CONFIG)
    assert r.weights == (("harmless", -2.0),)
    assert not parse_request({"align_decode": {"guides": {"helpful": 0}}}, CONFIG)
    assert not parse_request({"align_decode": {}}, CONFIG)


@pytest.mark.parametrize(
    "args, message",
    [
        ({"align_decode": {"guides": {"nope": 1.0}}}, "no guide named 'nope'; configured guides: harmless, helpful"),
        ({"align_decode": {"guides": {"helpful": "1"}}}, "must be a number"),
        ({"align_decode": {"guides": {"helpful": True}}}, "must be a number"),
        ({"align_decode": {"guides": {"helpful": float("nan")}}}, "must be finite"),
        ({"align_decode": {"guides": {"helpful": float("inf")}}}, "must be finite"),
        ({"align_decode": {"guides": ["helpful"]}}, "must map guide names to weights"),
        ({"align_decode": {"guide": {"helpful": 1}}}, "unknown key"),
        ({"align_decode": "{bad json"}, "not valid JSON"),
        ({"align_decode": 3}, "must be an object"),
    ],
)
def test_malformed_requests_are_refused_with_a_clear_message(args, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        parse_request(args, CONFIG)


def test_a_request_naming_a_guide_on_a_server_without_guides_says_so():
    with pytest.raises(ValueError, match="none .the server sets no ALIGN_DECODE_GUIDES"):
        parse_request({"align_decode": {"guides": {"helpful": 1.0}}}, GuideConfig())
