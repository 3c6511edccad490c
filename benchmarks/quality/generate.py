"""Running each method on the held-out prompts and keeping what the metrics need, response by response.

Every setting draws `samples` responses per prompt at T = 1 with no truncation (so "the policy" in a KL
is the policy at T = 1). Each method family has its own seeds (a pure function of the run's seed, the
family and the prompt's id), so methods are compared on independent draws, and the settings of one
family (its weights or N) share draws, which keeps its curve smooth.

Compute is counted as forward token positions in policy-size units, per response: every token position
run through a transformer, weighted by that model's share of the policy's matmul parameters (a model the
size of the policy counts 1 per position). The prompt's prefill is shared by a prompt's responses.
Reward calls (text rewards on the CPU) are counted separately.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import torch

from align_decode.decoding import GenerationSettings, Policy, PromptBatch, left_pad
from align_decode.decoding.candidates import completion_ids, sample_candidates, score_completions
from align_decode.decoding.strategy import Sample
from align_decode.commandline.run import encode_prompt, prompt_seed


@dataclass
class Responses:
    """One setting's responses: response j answers prompt prompt_index[j] (sample sample_index[j])."""

    family: str
    label: str
    param: float | None
    prompt_index: list[int] = field(default_factory=list)
    sample_index: list[int] = field(default_factory=list)
    ids: list[list[int]] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    method_logprobs: list[list[float]] | None = None  # under the law each token was drawn from
    policy_logprobs: list[list[float]] | None = None  # under the policy at T = 1
    compute: list[float] = field(default_factory=list)
    reward_calls: list[float] = field(default_factory=list)
    seconds: float = 0.0
    kl: list[float] | None = None  # set by the method when its KL is not the token-level estimate
    kl_kind: str = "mc"
    extra: dict = field(default_factory=dict)


def matmul_params(model) -> int:
    """Parameters that cost multiply-adds per token: every weight but the input embedding table (a
    lookup); a tied output head is counted once, as the head."""
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is emb
    total = sum(p.numel() for p in model.parameters())
    return total if tied else total - emb.numel()


@dataclass
class EvalContext:
    policy: Policy
    records: list  # PromptRecord, the held-out prompts
    chat_template: bool
    source: str
    samples: int
    max_new_tokens: int
    batch_prompts: int
    seed: int
    prompt_ids: list[list[int]] = field(init=False)

    def __post_init__(self):
        tok = self.policy.tokenizer
        self.prompt_ids = [encode_prompt(r, tok, self.chat_template, self.source) for r in self.records]
        self.policy_size = matmul_params(self.policy.model)

    def settings(self, family: str, prompts: range, n: int) -> GenerationSettings:
        seeds = [prompt_seed(self.seed, f"{family}/{self.records[i].key}") for i in prompts]
        return GenerationSettings.resolve(
            self.policy.model, self.policy.tokenizer, None, 0, max_new_tokens=self.max_new_tokens, do_sample=True,
            temperature=1.0, top_k=0, top_p=1.0, num_return_sequences=n, seed=torch.tensor(seeds, dtype=torch.long))

    def chunks(self, limit: int | None = None):
        count = len(self.records) if limit is None else min(limit, len(self.records))
        for start in range(0, count, self.batch_prompts):
            index = range(start, min(start + self.batch_prompts, count))
            ids, mask = left_pad([self.prompt_ids[i] for i in index], self.pad_id, device=self.policy.device)
            yield index, PromptBatch(ids, mask, [self.records[i].text for i in index])

    @property
    def pad_id(self) -> int:
        tok = self.policy.tokenizer
        return tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    def size_of(self, model) -> float:
        return matmul_params(model) / self.policy_size


def _rows(decoded, r: int) -> tuple[list[int], list[float]]:
    length = int(decoded.lengths[r])
    return decoded.tokens[r, :length].tolist(), decoded.logprobs[r, :length].tolist()


def run_token_method(ctx: EvalContext, strategy, family: str, label: str, param: float | None,
                     guide_cost: float = 0.0, reward_calls_per_token: float = 0.0, limit: int | None = None,
                     rollout_accounting: bool = False) -> Responses:
    """A token-level strategy (plain sampling, GenARM, CD, ARGS, Transfer Q*): S rows per prompt.

    guide_cost: the guides' forward positions per policy position, in policy-size units (an ARM the
    size of the policy: 1; a scalar value model read on k candidates: k * its size)."""
    out = Responses(family, label, param, method_logprobs=[])
    s = ctx.samples
    for index, batch in ctx.chunks(limit):
        settings = ctx.settings(family, index, s)
        started = time.perf_counter()
        with torch.no_grad():
            decoded = strategy.run(ctx.policy, batch, settings)
        out.seconds += time.perf_counter() - started
        rollout_positions = 0.0
        if rollout_accounting:  # Transfer Q*: rollouts share the batch; spread them evenly over its rows
            ex = decoded.extras
            rollout_positions = (ex["rollout_tokens"] + ex["rollouts"]) / decoded.tokens.shape[0]
        for j, i in enumerate(index):
            for k in range(s):
                ids, lps = _rows(decoded, j * s + k)
                out.prompt_index.append(i)
                out.sample_index.append(k)
                out.ids.append(ids)
                out.method_logprobs.append(lps)
                positions = len(ctx.prompt_ids[i]) / s + len(ids)
                out.compute.append(positions * (1.0 + guide_cost) + rollout_positions)
                out.reward_calls.append(reward_calls_per_token * len(ids))
    return out


def run_best_of_n(ctx: EvalContext, reward, n_values) -> tuple[list[Responses], dict]:
    """One pool of max(N) * S plain samples per prompt; best-of-N for response slot k picks among pool
    entries k * max(N) ... k * max(N) + N - 1, so every N reuses the same draws. Returns the settings and
    the pool's rewards per prompt (plain samples of the policy, which QAlign's KL estimate needs)."""
    n_max, s = max(n_values), ctx.samples
    pool_ids, pool_lps, pool_r, seconds = {}, {}, {}, 0.0
    for index, batch in ctx.chunks():
        settings = replace(ctx.settings("best_of_n", index, 1), num_return_sequences=1)
        started = time.perf_counter()
        with torch.no_grad():
            drawn = sample_candidates(Sample(), ctx.policy, batch, settings, n_max * s, max_rows=64)
        seconds += time.perf_counter() - started
        ids = completion_ids(drawn)
        m = n_max * s
        texts = [t for t in batch.texts for _ in range(m)]
        r = score_completions(reward, ctx.policy.tokenizer, texts, ids).tolist()
        for b, i in enumerate(index):
            pool_ids[i] = ids[b * m:(b + 1) * m]
            # A plain sample at T = 1: the log-probs it was drawn with are the policy's.
            pool_lps[i] = [drawn.logprobs[b * m + c, : len(pool_ids[i][c])].tolist() for c in range(m)]
            pool_r[i] = r[b * m:(b + 1) * m]
    results = []
    for n in n_values:
        out = Responses("best_of_n", f"best-of-{n}", n, policy_logprobs=[], kl_kind="bound")
        out.seconds = seconds * n / n_max  # the share of the pool this N uses
        for i in range(len(ctx.records)):
            for k in range(s):
                group = range(k * n_max, k * n_max + n)
                best = max(group, key=lambda c: (pool_r[i][c], -c))  # the first wins ties
                out.prompt_index.append(i)
                out.sample_index.append(k)
                out.ids.append(pool_ids[i][best])
                out.policy_logprobs.append(pool_lps[i][best])
                out.compute.append(len(ctx.prompt_ids[i]) / s + sum(len(pool_ids[i][c]) for c in group))
                out.reward_calls.append(float(n))
        results.append(out)
    return results, pool_r


def run_qalign(ctx: EvalContext, reward, beta: float, steps: int, checkpoints) -> list[Responses]:
    """QAlign with S chains per prompt; the chain states at each checkpoint step are that many steps'
    answers (a chain run for k steps is the first k steps of a longer one)."""
    from align_decode import QAlign

    s = ctx.samples
    strategy = QAlign(reward, beta=beta, steps=steps, chains=s)
    family = "qalign"
    outs = {k: Responses(family, f"qalign beta={beta} steps={k}", beta, policy_logprobs=[], kl_kind="target",
                         extra={"steps": k, "beta": beta, "acceptance": []})
            for k in checkpoints}
    seconds = 0.0
    for index, batch in ctx.chunks():
        settings = ctx.settings(family, index, s)
        started = time.perf_counter()
        with torch.no_grad():
            decoded = strategy.run(ctx.policy, batch, settings)
        seconds += time.perf_counter() - started
        trace = decoded.extras["trace"]
        for j, i in enumerate(index):
            for c in range(s):
                row = j * s + c
                # Positions run through the policy up to each step: the prompt (shared by the chains), the
                # first sample, then each proposal's new suffix plus the one token re-fed at the cut.
                spent = [len(ctx.prompt_ids[i]) / s + len(trace["states"][0][row])]
                for t in range(steps):
                    suffix = len(trace["proposals"][t][row]) - int(trace["indices"][t][row])
                    spent.append(spent[-1] + suffix + 1)
                for k, out in outs.items():
                    state = trace["states"][k][row]
                    out.prompt_index.append(i)
                    out.sample_index.append(c)
                    out.ids.append(state)
                    out.policy_logprobs.append(trace["state_logprobs"][k][row])
                    out.compute.append(spent[k])
                    out.reward_calls.append(float(k + 1))
                    accepted = trace["accepted"][1:k + 1, row].float().mean().item() if k else 1.0
                    out.extra["acceptance"].append(accepted)
    final = sum(outs[max(outs)].compute)
    for out in outs.values():  # wall time shared out in proportion to the positions each step count ran
        out.seconds = seconds * sum(out.compute) / final
    return [outs[k] for k in checkpoints]


@torch.no_grad()
def policy_logprobs(ctx: EvalContext, responses: Responses, batch: int = 16) -> list[list[float]]:
    """log p(y_t | x, y_<t) at T = 1 for every response token, by one teacher-forced forward pass."""
    model = ctx.policy.model
    device = ctx.policy.device
    out: list[list[float]] = []
    for start in range(0, len(responses.ids), batch):
        rows = range(start, min(start + batch, len(responses.ids)))
        seqs = [ctx.prompt_ids[responses.prompt_index[j]] + responses.ids[j] for j in rows]
        width = max(len(q) for q in seqs)
        ids = torch.full((len(seqs), width), ctx.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, q in enumerate(seqs):  # right padding: a causal model's real positions never see it
            ids[r, : len(q)] = torch.tensor(q)
            mask[r, : len(q)] = 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        for r, j in enumerate(rows):
            p_len, n = len(ctx.prompt_ids[responses.prompt_index[j]]), len(responses.ids[j])
            if n == 0:
                out.append([])
                continue
            step = torch.log_softmax(logits[r, p_len - 1: p_len - 1 + n].float(), -1)
            out.append(step.gather(-1, torch.tensor(responses.ids[j], device=device)[:, None]).squeeze(-1).tolist())
    return out
