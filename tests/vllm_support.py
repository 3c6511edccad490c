"""Shared fixtures for the vLLM plugin tests: tiny policy and guide folders saved once per session."""

from __future__ import annotations

import gc
import json
import math
from pathlib import Path

import torch

from tiny import EOS, tiny_llama, tiny_tokenizer

POLICY_SEED, ARM_SEED, ARM2_SEED = 0, 1, 2


def save_models(root: Path) -> dict[str, Path]:
    """A tiny policy and two tiny ARMs sharing its tokenizer, as local folders vLLM can load."""
    tok = tiny_tokenizer()
    paths = {}
    for name, seed in (("policy", POLICY_SEED), ("arm", ARM_SEED), ("arm2", ARM2_SEED)):
        path = root / name
        if not (path / "config.json").exists():
            tiny_llama(seed=seed).save_pretrained(path)
            tok.save_pretrained(path)
        paths[name] = path
    return paths


def guides_env(paths: dict[str, Path]) -> str:
    return json.dumps({"arm": {"path": str(paths["arm"])}, "arm2": {"path": str(paths["arm2"]), "kind": "qhead"}})


def load(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@torch.no_grad()
def guide_scores(model, tokens, width: int) -> torch.Tensor:
    """A guide's raw next-token scores after `tokens`, computed from scratch."""
    return model(input_ids=torch.tensor([list(tokens)])).logits[0, -1, :width].float()


# ------------------------------------------------------------- requests and checks shared by both paths
# (the logits-processor plugin's guides beside vLLM, and the composite model's guides inside it)
def guided(weights: dict, **kw):
    from vllm import SamplingParams

    return SamplingParams(extra_args={"align_decode": {"guides": weights}}, **kw)


def plain(**kw):
    from vllm import SamplingParams

    return SamplingParams(**kw)


def record_preemptions(llm) -> list:
    """The ids of requests the in-process engine's scheduler preempts from now on (filled as it runs)."""
    scheduler = llm.llm_engine.engine_core.engine_core.scheduler
    preempted = []
    original = scheduler._preempt_request

    def counting(request, *args, **kwargs):
        preempted.append(request.request_id)
        return original(request, *args, **kwargs)

    scheduler._preempt_request = counting
    return preempted


def shutdown(llm) -> None:
    engine = getattr(llm, "llm_engine", None)
    if engine is not None and hasattr(engine, "engine_core"):
        try:
            engine.engine_core.shutdown()
        except Exception:
            pass
    del llm
    gc.collect()


def run(llm, prompts, params):
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def hf_greedy(paths, refs, prompt, weights: dict, max_new: int) -> list[int]:
    """This project's Hugging Face backend on the same models: GenARM with the same weights."""
    from transformers import AutoTokenizer

    from align_decode import ARM, AlignedModel, GenARM

    tok = AutoTokenizer.from_pretrained(paths["policy"])
    weights = {k: w for k, w in weights.items() if w != 0}
    strategy = GenARM([ARM(refs[k], tok) for k in weights], weights=list(weights.values())) if weights else None
    out = AlignedModel(refs["policy"], tok, strategy=strategy).generate(
        torch.tensor([prompt]), max_new_tokens=max_new, do_sample=False)
    new = out[0, len(prompt):].tolist()
    return new[: new.index(EOS) + 1] if EOS in new else new


def check_greedy_equals_hugging_face(setup, prompts, weights) -> None:
    llm, paths, refs = setup
    got = run(llm, prompts, [guided(weights, temperature=0, max_tokens=20)] * len(prompts))
    assert got == [hf_greedy(paths, refs, p, weights, 20) for p in prompts]
    assert got != run(llm, prompts, [plain(temperature=0, max_tokens=20)] * len(prompts))


def check_mixed_batch(setup, cases) -> None:
    """Guided and plain, sampled and greedy requests in one batch: each gets what it gets alone, and the
    greedy ones the Hugging Face path's answer."""
    llm, paths, refs = setup
    together = run(llm, [p for p, _ in cases], [sp for _, sp in cases])
    assert together == [run(llm, [p], [sp])[0] for p, sp in cases]
    for (prompt, sp), out in zip(cases, together):
        if sp.temperature == 0:
            weights = (sp.extra_args or {}).get("align_decode", {}).get("guides", {})
            assert out == hf_greedy(paths, refs, prompt, weights, 14)
    assert together[0] != together[1] and together[2] != together[3]


@torch.no_grad()
def check_sampled_law(setup, prompt) -> None:
    """vLLM divides by T after the processor: the law it reports must be log_softmax(s/T + sum w g)."""
    llm, _, refs = setup
    weights, temperature = {"arm": 1.0, "arm2": 0.5}, 0.7
    sp = guided(weights, temperature=temperature, seed=11, max_tokens=8, logprobs=5)
    out = llm.generate([{"prompt_token_ids": prompt}], sp, use_tqdm=False)[0].outputs[0]
    seq = list(prompt)
    for token, reported in zip(out.token_ids, out.logprobs):
        s = refs["policy"](input_ids=torch.tensor([seq])).logits[0, -1].float()
        z = s / temperature + sum(w * guide_scores(refs[k], seq, s.shape[0]) for k, w in weights.items())
        law = torch.log_softmax(z, -1)
        for tok, lp in reported.items():
            assert math.isclose(lp.logprob, law[tok].item(), abs_tol=2e-3), (tok, lp.logprob, law[tok].item())
        seq.append(token)
