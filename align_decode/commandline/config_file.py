"""Config files for the command line: every option of a command in a TOML or YAML file, flags override.

Keys are the long option names, with dashes or underscores (`max-new-tokens = 64`, `max_new_tokens: 64`);
repeatable options take a list (`arm = ["arm1", "arm2"]`). An unknown key is an error, not a silent no-op.
"""

from __future__ import annotations

from pathlib import Path

import click
from click.core import ParameterSource

_TOML = {".toml"}
_YAML = {".yaml", ".yml"}


def load_config(path) -> dict:
    """The file's options as {python_name: value}."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    suffix = path.suffix.lower()
    text = path.read_text(encoding="utf-8")
    if suffix in _TOML:
        import tomllib

        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"{path}: not valid TOML: {e}") from None
    elif suffix in _YAML:
        try:
            import yaml
        except ImportError:
            raise ValueError(f"{path}: reading YAML needs PyYAML (pip install pyyaml), or use a .toml file") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ValueError(f"{path}: not valid YAML: {' '.join(str(e).split())}") from None
        data = {} if data is None else data
    else:
        raise ValueError(f"config file {path} must end in .toml, .yaml or .yml")
    if not isinstance(data, dict):
        raise ValueError(f"{path}: the config must be a table of option = value pairs")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def apply_config(ctx: click.Context, path=None) -> dict[str, str]:
    """Fill the options not given on the command line from the config file at `path` (if any),
    converting each value as click would. Returns {option name: where it was set} for every option not
    left at its default."""
    params = {p.name: p for p in ctx.command.params}
    # A key may also be another long name of the option (an old flag name kept for a release).
    aliases = {opt[2:].replace("-", "_"): p.name for p in ctx.command.params for opt in p.opts if opt.startswith("--")}
    origins = {
        name: "the command line"
        for name in params
        if ctx.get_parameter_source(name) not in (None, ParameterSource.DEFAULT)
    }
    config = load_config(path) if path is not None else {}
    for name, value in config.items():
        name = aliases.get(name, name)
        param = params.get(name)
        if param is None or name == "config":
            known = ", ".join(sorted(n.replace("_", "-") for n in params if n != "config"))
            raise ValueError(f"{path}: unknown option {name.replace('_', '-')!r}; options are: {known}")
        if name in origins:
            continue  # the command line wins
        if getattr(param, "multiple", False) and not isinstance(value, (list, tuple)):
            value = [value]
        try:
            ctx.params[name] = param.type_cast_value(ctx, value)
        except click.BadParameter as e:
            raise ValueError(f"{path}: {name.replace('_', '-')}: {e.format_message()}") from None
        origins[name] = str(path)
    return origins
