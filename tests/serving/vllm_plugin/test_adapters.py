"""The vLLM processor against vLLM's own classes with hand-built state (no engine).

Model runner V1: batch updates (adds, removals, one-way moves, swaps, re-adds after preemption)
generated the way vLLM's persistent batch does, through the real `BatchUpdate`.
Model runner V2: the real `RequestState` / `LogitsProcRequestState` / `LogitsContext` (V2 cannot run on
a CPU, so the runner's staged writes are done by hand), with reordered rows, slot reuse, chunked
prefill, preemption and eviction.

Every guided row is checked against the guides run from scratch on the request's prefix.
"""

from __future__ import annotations

import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch

pytest.importorskip("vllm", reason="vLLM is not installed (scripts/setup-vllm.sh)")

from vllm import SamplingParams  # noqa: E402
from vllm.v1.sample.logits_processor import BatchUpdate, MoveDirectionality  # noqa: E402

from align_decode.serving.vllm_plugin import config as plugin_config  # noqa: E402
from align_decode.serving.vllm_plugin.processor import GuidanceLogitsProcessor  # noqa: E402

from vllm_support import guide_scores, guides_env, load, save_models  # noqa: E402

pytestmark = pytest.mark.vllm

V = 64
LOGITS = 70  # the policy head may be wider than the tokenizer: columns 64.. are masked on guided rows


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    paths = save_models(tmp_path_factory.mktemp("vllm-models"))
    return paths, {"arm": load(paths["arm"]), "arm2": load(paths["arm2"])}


@pytest.fixture
def guides(models, monkeypatch):
    paths, refs = models
    monkeypatch.setenv(plugin_config.ENV_VAR, guides_env(paths))
    return paths, refs


def fake_vllm_config(policy_path, width=LOGITS, async_scheduling=False, speculative=None):
    model_config = SimpleNamespace(tokenizer=str(policy_path), skip_tokenizer_init=False, trust_remote_code=False,
                                   tokenizer_revision=None, get_vocab_size=lambda: width)
    return SimpleNamespace(model_config=model_config, speculative_config=speculative,
                           scheduler_config=SimpleNamespace(async_scheduling=async_scheduling))


def params(rng: random.Random):
    """Random request parameters: unguided, one guide, two guides; greedy or sampled."""
    temperature = rng.choice([0.0, 0.7, 1.3])
    kind = rng.randrange(4)
    extra = {
        0: None,
        1: {"align_decode": {"guides": {"arm": 1.0}}},
        2: {"align_decode": {"guides": {"arm": 0.4, "arm2": -1.5}}},
        3: {"align_decode": {"guides": {"arm2": 2.0, "arm": 0.0}}},
    }[kind]
    return SamplingParams(temperature=temperature, extra_args=extra)


def expected(row, sp, tokens, refs):
    """The GenARM rule as vLLM's later temperature division needs it: s + c * sum_i w_i g_i."""
    row = row.clone()
    ad = (sp.extra_args or {}).get("align_decode")
    weights = {k: w for k, w in (ad or {"guides": {}})["guides"].items() if w != 0}
    if not weights:
        return row
    c = sp.temperature if sp.temperature >= 1e-5 else 1.0
    for name, w in weights.items():
        row[:V] += c * w * guide_scores(refs[name], tokens, V)
    row[V:] = float("-inf")
    return row


def assert_rows(out, before, expect):
    for i in range(out.shape[0]):
        if expect[i] is None:
            continue
        if torch.equal(expect[i], before[i]):
            assert torch.equal(out[i], before[i]), f"row {i} is unguided but changed"
        else:
            torch.testing.assert_close(out[i], expect[i], rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------------------------- loading
def test_the_entry_point_loads_this_class_for_both_model_runners():
    from importlib.metadata import entry_points

    from vllm.v1.sample.logits_processor import _load_logitsprocs_plugins
    from vllm.v1.worker.gpu.sample.logits_processor.loader import _load_v2_logitsprocs_plugins

    names = {ep.name: ep.value for ep in entry_points(group="vllm.logits_processors")}
    assert names.get("align_decode") == "align_decode.serving.vllm_plugin.processor:GuidanceLogitsProcessor"
    assert GuidanceLogitsProcessor in _load_logitsprocs_plugins()
    # V2's loader refuses V1-interface classes: this one implements both.
    assert GuidanceLogitsProcessor in _load_v2_logitsprocs_plugins()


def test_without_configuration_the_processor_is_a_free_no_op(models, monkeypatch):
    monkeypatch.delenv(plugin_config.ENV_VAR, raising=False)
    proc = GuidanceLogitsProcessor(fake_vllm_config(models[0]["policy"]), torch.device("cpu"), False)
    assert proc.is_argmax_invariant()  # V1 then skips it for greedy batches
    sp = SamplingParams(temperature=0)
    proc.update_state(BatchUpdate(batch_size=1, removed=[], added=[(0, sp, [2, 7], [])], moved=[]))
    logits = torch.randn(1, LOGITS)
    assert proc.apply(logits.clone()).equal(logits)
    GuidanceLogitsProcessor.validate_params(sp)  # unguided: fine


# ------------------------------------------------------------------------------------------ admission
def test_validate_params_accepts_good_requests_and_refuses_bad_ones(guides):
    ok = [None, {}, {"align_decode": {"guides": {"arm": 1.0, "arm2": 0.5}}}, {"align_decode": '{"guides": {"arm": 2}}'}]
    for extra in ok:
        GuidanceLogitsProcessor.validate_params(SamplingParams(extra_args=extra))
    with pytest.raises(ValueError, match="no guide named 'helpful'; configured guides: arm, arm2"):
        GuidanceLogitsProcessor.validate_params(SamplingParams(extra_args={"align_decode": {"guides": {"helpful": 1}}}))
    with pytest.raises(ValueError, match="must be finite"):
        GuidanceLogitsProcessor.validate_params(
            SamplingParams(extra_args={"align_decode": {"guides": {"arm": float("inf")}}}))


def test_validate_params_reports_a_broken_server_configuration(monkeypatch):
    monkeypatch.setenv(plugin_config.ENV_VAR, "{oops")
    with pytest.raises(ValueError, match="unavailable on this server.*not valid JSON"):
        GuidanceLogitsProcessor.validate_params(SamplingParams(extra_args={"align_decode": {"guides": {"a": 1}}}))
    GuidanceLogitsProcessor.validate_params(SamplingParams())  # requests that do not opt in are unaffected


def test_engines_the_guides_cannot_follow_are_refused_at_start_up(guides):
    paths, _ = guides
    with pytest.raises(ValueError, match="--no-async-scheduling"):
        GuidanceLogitsProcessor(fake_vllm_config(paths["policy"], async_scheduling=True), torch.device("cpu"), False)
    with pytest.raises(ValueError, match="speculative decoding"):
        GuidanceLogitsProcessor(fake_vllm_config(paths["policy"], speculative=object()), torch.device("cpu"), False)


def test_a_guide_with_another_tokenizer_is_refused_at_start_up(guides, tmp_path, monkeypatch):
    from tiny import tiny_llama, tiny_tokenizer

    other = tmp_path / "other"
    tiny_llama(seed=5).save_pretrained(other)
    tiny_tokenizer(shift=3).save_pretrained(other)
    monkeypatch.setenv(plugin_config.ENV_VAR, f'{{"odd": {{"path": "{other}"}}}}')
    with pytest.raises(ValueError, match="guide 'odd' does not share the policy's tokenizer"):
        GuidanceLogitsProcessor(fake_vllm_config(guides[0]["policy"]), torch.device("cpu"), False)


# ------------------------------------------------------------------------------------------- runner V1
class PersistentBatch:
    """A small imitation of vLLM V1's persistent batch bookkeeping, emitting real BatchUpdates."""

    def __init__(self):
        self.slots: list = []  # index -> request dict
        self.removed: list[int] = []
        self.added: list = []
        self.moved: list = []

    def remove(self, index):
        self.slots[index] = None
        self.removed.append(index)

    def add(self, req):
        # Like InputBatch: fill the lowest removed index (taking it off the removed list), else append.
        holes = sorted(i for i in self.removed if self.slots[i] is None)
        if holes:
            index = holes[0]
            self.removed.remove(index)
        else:
            index = len(self.slots)
            self.slots.append(None)
        self.slots[index] = req
        self.added.append((index, req["params"], req["prompt"], req["output"]))

    def condense(self):
        # Slide the last requests into the holes (one-way moves), as InputBatch.condense does.
        while True:
            holes = [i for i, s in enumerate(self.slots) if s is None]
            if not holes:
                break
            last = max(i for i, s in enumerate(self.slots) if s is not None) if any(self.slots) else -1
            if last < holes[0]:
                del self.slots[holes[0]:]
                break
            self.slots[holes[0]], self.slots[last] = self.slots[last], None
            self.moved.append((last, holes[0], MoveDirectionality.UNIDIRECTIONAL))

    def swap(self, a, b):
        self.slots[a], self.slots[b] = self.slots[b], self.slots[a]
        self.moved.append((a, b, MoveDirectionality.SWAP))

    def update(self):
        if not (self.removed or self.added or self.moved):
            return None
        bu = BatchUpdate(batch_size=len(self.slots), removed=sorted(self.removed, reverse=True),
                         added=list(self.added), moved=list(self.moved))
        self.removed, self.added, self.moved = [], [], []
        return bu


def test_v1_follows_the_persistent_batch_and_mixes_exactly(guides):
    paths, refs = guides
    proc = GuidanceLogitsProcessor(fake_vllm_config(paths["policy"]), torch.device("cpu"), False)
    assert not proc.is_argmax_invariant() and proc.runner == "v1"
    rng = random.Random(1)
    torch.manual_seed(1)
    pb = PersistentBatch()
    waiting = []  # preempted requests, to come back with their outputs so far
    checked_guided = 0
    for step in range(16):
        for i, req in enumerate(pb.slots):
            if req is not None and rng.random() < 0.15:
                pb.remove(i)
                if rng.random() < 0.5:
                    waiting.append(req)  # preempted: re-added later with the same output list
        for _ in range(rng.randint(0, 2) if step else 4):
            if waiting and rng.random() < 0.5:
                pb.add(waiting.pop())
            else:
                prompt = [2] + [rng.randrange(6, V) for _ in range(rng.randint(1, 7))]
                pb.add({"params": params(rng), "prompt": prompt, "output": []})
        pb.condense()
        if len(pb.slots) >= 2 and rng.random() < 0.5:
            pb.swap(*rng.sample(range(len(pb.slots)), 2))
        proc.update_state(pb.update())
        if not pb.slots:
            continue
        logits = torch.randn(len(pb.slots), LOGITS)
        before = logits.clone()
        expect = [expected(before[i], r["params"], r["prompt"] + r["output"], refs) for i, r in enumerate(pb.slots)]
        out = proc.apply(logits)
        assert_rows(out, before, expect)
        checked_guided += sum(not torch.equal(e, b) for e, b in zip(expect, before))
        for r in pb.slots:  # the sampler appends one token to every request's live output list
            r["output"].append(rng.randrange(6, V))
    assert checked_guided > 25
    # Only requests still in the batch keep guide rows.
    live = {id(r["output"]) for r in pb.slots if r is not None}
    for rows in proc.batch.rows.values():
        assert all(id(req.handle[1]) in live for req in rows.requests)
    # Everything leaves: the guide caches are freed at once, with no further step.
    proc.update_state(BatchUpdate(batch_size=0, removed=list(range(len(pb.slots)))[::-1], added=[], moved=[]))
    assert all(rows.session is None for rows in proc.batch.rows.values())


def test_v1_request_given_as_embeddings_is_served_unguided(guides):
    proc = GuidanceLogitsProcessor(fake_vllm_config(guides[0]["policy"]), torch.device("cpu"), False)
    sp = SamplingParams(extra_args={"align_decode": {"guides": {"arm": 1.0}}})
    proc.update_state(BatchUpdate(batch_size=1, removed=[], added=[(0, sp, None, [])], moved=[]))
    logits = torch.randn(1, LOGITS)
    assert proc.apply(logits.clone()).equal(logits)


# ------------------------------------------------------------------------------------------- runner V2
@pytest.fixture
def v2_state(monkeypatch):
    import vllm.v1.worker.gpu.buffer_utils as buffer_utils
    from vllm.v1.worker.gpu.sample.logits_processor import LogitsProcRequestState
    from vllm.v1.worker.gpu.states import RequestState

    # No pinned memory on a CPU-only machine: use the runner's own non-UVA fallback buffers.
    monkeypatch.setattr(buffer_utils, "is_uva_available", lambda: False)
    rs = RequestState(max_num_reqs=6, max_model_len=64, max_num_batched_tokens=64, num_speculative_steps=0,
                      vocab_size=LOGITS, device=torch.device("cpu"))
    return rs, LogitsProcRequestState.from_request_state(rs)


def v2_context(slots, seq_lens):
    from vllm.v1.worker.gpu.sample.logits_processor import LogitsContext

    idx = torch.tensor(slots, dtype=torch.int32)
    n = len(slots)
    return LogitsContext(expanded_idx_mapping=idx, idx_mapping=idx, idx_mapping_np=np.array(slots, dtype=np.int32),
                         expanded_local_pos=torch.zeros(n, dtype=torch.int32),
                         input_ids=torch.zeros(n, dtype=torch.int32),
                         pos=torch.tensor(seq_lens, dtype=torch.int32) - 1,
                         seq_lens_upper_bound_np=np.array(seq_lens, dtype=np.int32))


def test_v2_follows_slots_and_mixes_exactly(guides, v2_state):
    paths, refs = guides
    rs, lp_state = v2_state
    proc = GuidanceLogitsProcessor(fake_vllm_config(paths["policy"]), lp_state)
    assert proc.runner == "v2"
    rng = random.Random(2)
    torch.manual_seed(2)
    live = {}  # req_id -> {"params", "tokens" (host mirror), "prefill", "done" (prefill tokens computed)}
    counter = 0
    checked_guided = 0

    def admit(req_id, req):
        # What the model runner does in add_requests(): RequestState.add_request, the sampler's
        # add_request (ours among its processors), then the staged writes (done by hand here).
        rs.add_request(req_id, prompt_len=req["prompt_len"], all_token_ids=req["tokens"], num_computed_tokens=0,
                       max_tokens=32)
        slot = rs.req_id_to_index[req_id]
        rs.all_token_ids.gpu[slot, : len(req["tokens"])] = torch.tensor(req["tokens"], dtype=torch.int32)
        req["prefill"], req["done"] = len(req["tokens"]), 0
        return proc.add_request(slot, req["params"])

    for step in range(18):
        for req_id in list(live):
            if rng.random() < 0.12:  # finished, or preempted (re-added later with its outputs)
                rs.remove_request(req_id)
                req = live.pop(req_id)
                if rng.random() < 0.5 and len(req["tokens"]) < 50:
                    counter += 1
                    live[f"r{counter}"] = req
                    admit(f"r{counter}", req)
        while len(live) < 6 and rng.random() < (0.9 if step == 0 else 0.4):
            counter += 1
            long_prompt = rng.random() < 0.25  # prefilled in chunks over several steps
            size = rng.randint(12, 20) if long_prompt else rng.randint(1, 6)
            tokens = [2] + [rng.randrange(6, V) for _ in range(size)]
            req = {"params": params(rng), "tokens": tokens, "prompt_len": len(tokens)}
            live[f"r{counter}"] = req
            weights = ((req["params"].extra_args or {}).get("align_decode") or {}).get("guides", {})
            # The runner is told which requests the processor modifies: exactly those with a nonzero weight.
            assert admit(f"r{counter}", req) == any(w != 0 for w in weights.values())
        # Schedule a random subset in a random order (rows are reordered every step in V2).
        scheduled = [k for k in live if rng.random() < 0.85]
        rng.shuffle(scheduled)
        if not scheduled:
            continue
        slots, seq_lens = [], []
        for k in scheduled:
            req = live[k]
            if req["done"] < req["prefill"]:
                req["done"] = min(req["prefill"], req["done"] + 8)  # chunked prefill, 8 tokens per step
                seq_lens.append(req["done"])
            else:
                seq_lens.append(len(req["tokens"]))
            slots.append(rs.req_id_to_index[k])
        logits = torch.randn(len(scheduled), LOGITS)
        before = logits.clone()
        expect = []
        for k, n in zip(scheduled, seq_lens):
            req = live[k]
            # A row still inside its prefill is discarded by the runner: not checked.
            expect.append(expected(before[len(expect)], req["params"], req["tokens"][:n], refs)
                          if n >= req["prefill"] else None)
        out = proc.apply(logits, v2_context(slots, seq_lens))
        assert_rows(out, before, expect)
        checked_guided += sum(e is not None and not torch.equal(e, b) for e, b in zip(expect, before))
        for k, n in zip(scheduled, seq_lens):  # post_update: sampled tokens land in all_token_ids
            req = live[k]
            if n >= req["prefill"]:
                tok = rng.randrange(6, V)
                rs.all_token_ids.gpu[rs.req_id_to_index[k], len(req["tokens"])] = tok
                req["tokens"].append(tok)
    assert checked_guided > 20
    # Slots freed long ago hold no guide rows (evicted), and no row belongs to a stale request.
    for rows in proc.batch.rows.values():
        assert len(rows.requests) <= len(live) + proc._impl.evict_after * 2


def test_v2_declines_unguided_requests_and_resets_reused_slots(guides, v2_state):
    paths, _ = guides
    rs, lp_state = v2_state
    proc = GuidanceLogitsProcessor(fake_vllm_config(paths["policy"]), lp_state)
    guided = SamplingParams(temperature=0, extra_args={"align_decode": {"guides": {"arm": 1.0}}})
    rs.add_request("a", prompt_len=2, all_token_ids=[2, 9], num_computed_tokens=0, max_tokens=4)
    slot = rs.req_id_to_index["a"]
    rs.all_token_ids.gpu[slot, :2] = torch.tensor([2, 9], dtype=torch.int32)
    assert proc.add_request(slot, guided) is True
    logits = torch.zeros(1, LOGITS)
    assert not proc.apply(logits, v2_context([slot], [2])).eq(0).all()
    # The slot is recycled for an unguided request: declined, and its rows are left untouched.
    assert proc.add_request(slot, SamplingParams(temperature=0)) is False
    logits = torch.zeros(1, LOGITS)
    assert proc.apply(logits, v2_context([slot], [2])).eq(0).all()
    assert all(not rows.requests for rows in proc.batch.rows.values()) or len(proc.batch) == 0


def test_v2_frees_the_rows_of_absent_slots_and_rebuilds_them_on_return(guides, v2_state):
    paths, refs = guides
    rs, lp_state = v2_state
    proc = GuidanceLogitsProcessor(fake_vllm_config(paths["policy"]), lp_state)
    sp = SamplingParams(temperature=0, extra_args={"align_decode": {"guides": {"arm": 1.0}}})
    tokens = {"a": [2, 9, 10], "b": [2, 30]}
    for rid, toks in tokens.items():
        rs.add_request(rid, prompt_len=len(toks), all_token_ids=toks, num_computed_tokens=0, max_tokens=8)
        rs.all_token_ids.gpu[rs.req_id_to_index[rid], : len(toks)] = torch.tensor(toks, dtype=torch.int32)
        proc.add_request(rs.req_id_to_index[rid], sp)
    sa, sb = rs.req_id_to_index["a"], rs.req_id_to_index["b"]
    proc.apply(torch.zeros(2, LOGITS), v2_context([sa, sb], [3, 2]))
    rows = proc.batch.rows["arm"]
    assert len(rows.requests) == 2
    for _ in range(proc._impl.evict_after + 1):  # only b is scheduled
        tok = 11
        rs.all_token_ids.gpu[sb, len(tokens["b"])] = tok
        tokens["b"].append(tok)
        proc.apply(torch.zeros(1, LOGITS), v2_context([sb], [len(tokens["b"])]))
    proc.apply(torch.zeros(1, LOGITS), v2_context([sb], [len(tokens["b"])]))
    assert [r.handle for r in rows.requests] == [sb]  # a's guide rows were freed
    # a comes back with two more tokens: rebuilt from its token history, exact.
    for tok in (40, 41):
        rs.all_token_ids.gpu[sa, len(tokens["a"])] = tok
        tokens["a"].append(tok)
    out = proc.apply(torch.zeros(1, LOGITS), v2_context([sa], [len(tokens["a"])]))
    torch.testing.assert_close(out[0, :V], guide_scores(refs["arm"], tokens["a"], V), rtol=1e-4, atol=1e-4)
