"""Run configs: YAML files resolved onto nested dataclasses, with `section.key=value` overrides.

Resolution order: the dataclass defaults, then the YAML file, then the command-line overrides. Every key is checked:
an unknown key or a value of the wrong type is an error that names it, before any worker starts.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
import types
import typing
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    pass


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0])
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item,) = typing.get_args(tp)[:1] or (Any,)
        return tuple(_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value))
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp in (int, float):
        # YAML reads 6e-4 (no dot) as a string, so numeric strings are accepted; bools are not numbers here.
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        try:
            number = tp(value) if not isinstance(value, str) else tp(float(value) if tp is float else value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected {tp.__name__}, got {value!r}") from None
        if tp is int and isinstance(value, float) and value != int(value):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return number
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    if dataclasses.is_dataclass(tp):
        return build(tp, value, key)
    raise ConfigError(f"{key}: unsupported field type {tp}")


def build(cls: type[T], data: dict | None, prefix: str = "", base: T | None = None) -> T:
    """An instance of dataclass `cls` from a (nested) dict; unknown keys and wrong types raise ConfigError.

    Keys the dict leaves out keep their defaults: those of `base` when given, else the class's. A section whose
    field has a default_factory starts from that default, so a job that gives a shared section its own defaults
    (`run: Run = field(default_factory=lambda: Run(experiment="finetune"))`) keeps them under a partial YAML section.
    """
    data = data or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(f"unknown config key(s) {[where + k for k in unknown]}; known: {sorted(fields)}")
    kwargs = {name: _field_value(fields[name], hints[name], value, f"{prefix}.{name}" if prefix else name)
              for name, value in data.items()}
    try:
        return dataclasses.replace(base, **kwargs) if base is not None else cls(**kwargs)
    except ValueError as e:
        raise ConfigError(f"{prefix or cls.__name__}: {e}") from e


def _field_value(field: dataclasses.Field, tp: Any, value: Any, key: str) -> Any:
    """A field's value from the config: a section is built on top of the field's own default, a leaf coerced."""
    if isinstance(value, dict) and field.default_factory is not dataclasses.MISSING:
        default = field.default_factory()
        if dataclasses.is_dataclass(default):
            return build(type(default), value, key, base=default)
    return _coerce(value, tp, key)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = tree
    for p in parents:
        child = node.setdefault(p, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted}: {p} is not a section")
        node = child
    node[leaf] = value


def parse_override(text: str) -> tuple[str, Any]:
    """`section.key=value`, the value read as YAML (so 3, 3e-4, true, [a, b] and strings all work)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form section.key=value")
    key, raw = text.split("=", 1)
    try:
        return key.strip(), yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:  # an unclosed [ { or ": the value, then YAML's own one-line reason
        reason = " ".join(str(getattr(e, "problem", None) or e).split())
        raise ConfigError(f"override {text!r}: the value {raw!r} is not valid YAML ({reason}); quote it as a "
                          "string, e.g. key='\"...\"'") from e


def load(cls: type[T], path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (),
         overrides_from: str = "command-line override(s)") -> T:
    """`cls` from the YAML file at `path` with `overrides` applied; a ConfigError names the file or, when the file
    is fine by itself, the overrides (`overrides_from` says where they come from)."""
    tree: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            tree = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: invalid YAML: {e}") from e
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
    from_file = copy.deepcopy(tree)  # the file's own tree: the overrides change `tree` below
    for text in overrides:
        _set_dotted(tree, *parse_override(text))
    try:
        return build(cls, tree)
    except ConfigError as e:
        raise ConfigError(f"{_culprit(cls, path, from_file, overrides, overrides_from, str(e))}: {e}") from e


def _culprit(cls: type, path: Path | None, from_file: dict, overrides: list[str] | tuple[str, ...], overrides_from: str,
             error: str) -> str:
    """Where a config that does not build went wrong: the file when it fails by itself with the same error, else
    the overrides."""
    if overrides:
        try:
            build(cls, from_file)
        except ConfigError as e:
            if str(e) == error:
                return str(path or "config")
        return overrides_from if path is None else f"{overrides_from} of {path}"
    return str(path or "config")


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """{"train": {"max_lr": 1}} -> {"train.max_lr": 1}, as MLflow params."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


# ------------------------------------------------------------------------------------------ config-driven jobs


class OverridesParser(argparse.ArgumentParser):
    """A job's command line whose options may stand between its section.key=value overrides, as users type them
    (`name=exp2 --address local search=false`): plain argparse takes positionals in one run only and refuses the
    ones after an option."""

    def parse_args(self, args=None, namespace=None):  # type: ignore[override]
        return self.parse_intermixed_args(args, namespace)


def output_folder(text: str) -> Path:
    """argparse type of a one-shot job's output folder: a path that is a file is refused when the job starts, not
    after its work, when the first file is written there; so is a training run's folder (it holds train/, Ray
    Train's checkpoints), whose metrics.jsonl and MLflow run id the job would replace with its own."""
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a file; give a folder (made if missing)")
    if (path / "train").is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a training run's folder (it holds train/); give this job a"
                                         " folder of its own")
    return path


def add_output_options(parser: argparse.ArgumentParser, experiment: str, name_default: str) -> None:
    """The output options of the one-shot jobs (analyses, comparisons): a run name, the folder of its files, and
    where, if anywhere, MLflow records it. `name_default` says what --name defaults to, for the help."""
    out = parser.add_argument_group("output")
    out.add_argument("--name", type=plain_name, help=f"run name (default: {name_default})")
    out.add_argument("--output", type=output_folder, metavar="DIR", help=f"default runs/{experiment}/<name>")
    out.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else the local server)")
    out.add_argument("--no-mlflow", action="store_true", help="only write the files")


def default_output(args: argparse.Namespace, experiment: str, prefix: str) -> None:
    """Fills in what add_output_options left unset: the name <prefix>-<UTC time>, the folder runs/<experiment>/<name>."""
    args.name = args.name or f"{prefix}-{datetime.now(timezone.utc).strftime('%Y%m%d-%H%M%S')}"
    args.output = args.output or Path("runs") / experiment / args.name


def output_file(text: str) -> Path:
    """argparse type of a job's output file: a path that is a folder is refused when the job starts."""
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a folder; give the file to write, e.g. {path / 'results.json'}")
    return path


def check_counts(parser: argparse.ArgumentParser, args: argparse.Namespace, *options: str) -> None:
    """End the job (argparse's exit 2) when one of the count `options` is below 1, naming its flag; an option left
    unset (None) passes."""
    for option in options:
        value = getattr(args, option)
        if value is not None and value < 1:
            parser.error(f"--{option.replace('_', '-')} must be >= 1, got {value}")


def check_name(name: str, field: str) -> str:
    """A run, experiment or file-prefix name becomes one component of a path (runs/<experiment>/<name>/,
    data/<name>/<name>_train_000000.bin): a separator or `..` in it would put the outputs elsewhere, even outside
    the run root, and replace what is there."""
    if not name or name in (".", "..") or any(c in name for c in "/\\\0"):
        raise ValueError(f"{field}={name!r} must be a plain name, not a path (no '/' or '\\', not '.' or '..')")
    return name


def plain_name(text: str) -> str:
    """argparse type of a job's --name (see check_name)."""
    try:
        return check_name(text, "--name")
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix(f"--name={text!r} ")) from e


def job_parser(doc: str, config_help: str, overrides_example: str) -> argparse.ArgumentParser:
    """The command line every config-driven job shares: --config, section.key=value overrides, --address and
    --print-config. A job adds its own flags to the parser it gets back."""
    p = OverridesParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help=config_help)
    p.add_argument("overrides", nargs="*", help=f"section.key=value, e.g. {overrides_example}")
    p.add_argument("--address", default=None, help="Ray address (default: RAY_ADDRESS, a local head, or a new local Ray)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    return p


def config_for_job(
    cls: type[T], args: argparse.Namespace, prepare: Callable[[T], T] | None = None, validate: Callable[[T], None] | None = None
) -> T:
    """The job's config from --config and the overrides, adjusted by `prepare` and checked by `validate` (default:
    the config's own validate()). A bad config ends the job with `error: ...` naming the field; --print-config
    prints the resolved config, then ends the job: with status 0 when it passes the checks, else with the error."""
    from cluster.config.sections import JobConfig  # it imports this module

    try:
        cfg = load(cls, args.config, args.overrides)
        if prepare is not None:
            cfg = prepare(cfg)
    except (ConfigError, ValueError) as e:
        sys.exit(f"error: {e}")
    if args.print_config:  # printed before the checks of what lies outside it (data, models), which may fail
        print(json.dumps(to_dict(cfg), indent=2), flush=True)
    try:
        (validate or (lambda c: c.validate()))(cfg)
        if isinstance(cfg, JobConfig):  # a job of this kind logs its run to MLflow
            cfg.check_tracking()
    except (ConfigError, ValueError) as e:
        sys.exit(f"error: {e}")
    if args.print_config:
        sys.exit(0)
    return cfg
