"""Job configs: a YAML file validated by a pydantic model, with ``key=value`` overrides.

A bad config fails here, before a cluster is touched, naming the field.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Self, TypeVar

import yaml
from pydantic import BaseModel, ValidationError, field_validator, model_validator

from keeper_core.errors import ConfigError

C = TypeVar("C", bound=BaseModel)
S = TypeVar("S")


class TimeWindow(BaseModel):
    """A job's ``since``/``until`` bounds over the serving logs (feedback-export, ab-report).

    A time without a zone is UTC, as the logs stamp every event; an empty window (``since`` at
    or after ``until``) is a mistake, refused before the logs are read. Subclasses declare the
    two fields with their own descriptions.
    """

    since: datetime | None = None
    until: datetime | None = None

    @field_validator("since", "until")
    @classmethod
    def _utc(cls, v: datetime | None) -> datetime | None:
        return v.replace(tzinfo=UTC) if v is not None and v.tzinfo is None else v

    @model_validator(mode="after")
    def _window(self) -> Self:
        if self.since and self.until and self.since >= self.until:
            raise ValueError("since must be before until")
        return self


def parse_overrides(pairs: Sequence[str]) -> dict[str, Any]:
    """``["a=1", "b=x"]`` -> ``{"a": 1, "b": "x"}``; values are parsed as YAML scalars.

    A dotted key sets a nested field: ``grouping.max_gap_s=2`` -> ``{"grouping": {"max_gap_s": 2}}``.

    Raises:
        ConfigError: a pair is not ``key=value``, or its value is not valid YAML (naming the key
            and how to quote the value).
    """
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(
                f"override {pair!r} is not key=value (each value, a path too, is given as "
                "key=value or with its --flag: --help lists them)"
            )
        try:
            parsed = yaml.safe_load(value) if value.strip() else None
        except yaml.YAMLError as e:
            quoted = "'" + value.replace("'", "''") + "'"
            raise ConfigError(
                f"override {key.strip()!r}: value {value!r} is not valid YAML "
                f"({yaml_problem(e, position=False)}); to pass it as a string, quote it: "
                f'"{key.strip()}={quoted}"'
            ) from e
        _set(out, key.strip(), parsed)
    return out


def yaml_problem(e: yaml.YAMLError, *, position: bool = True) -> str:
    """A YAML error on one line: what is wrong, and (with ``position``) where."""
    problem = getattr(e, "problem", None)
    if not problem:
        return " ".join(str(e).split())
    mark = getattr(e, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if position and mark else ""
    return f"{problem}{where}"


def _set(data: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = data
    for name in parents:
        child = node.setdefault(name, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted!r}: {name!r} is not a mapping")
        node = child
    node[leaf] = value


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """``extra`` over ``base``, nested mappings merged key by key (an override keeps siblings)."""
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(model: type[C], path: str | Path | None = None, overrides: Sequence[str] = ()) -> C:
    """Read ``path`` (YAML mapping, optional), apply overrides, validate.

    Raises:
        ConfigError: unreadable file, not a mapping, or a field that fails validation (named).
    """
    data: dict[str, Any] = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text())
        except yaml.YAMLError as e:
            raise ConfigError(f"cannot read config {path}: {yaml_problem(e)}") from e
        except (OSError, UnicodeDecodeError) as e:  # missing, a folder, binary or not UTF-8
            raise ConfigError(f"cannot read config {path}: {e}") from e
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config {path} must be a mapping, got {type(loaded).__name__}")
        data.update(loaded or {})
    data = _merge(data, parse_overrides(overrides))
    return validate(model, data, where=f" in {path}" if path else "")


def validate(model: type[C], data: dict[str, Any], *, where: str = "") -> C:
    """``model`` from ``data``; a failure is one ConfigError naming every bad field.

    Raises:
        ConfigError: a field fails validation or a required one is missing.
    """
    try:
        return model.model_validate(data)
    except ValidationError as e:
        fields = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '(root)'}: {err['msg']}"
            for err in e.errors()
        )
        raise ConfigError(f"invalid {model.__name__}{where}: {fields}") from e


#: keeper's loggers: ``keeper.<job>`` and each package's ``__name__`` loggers.
KEEPER_LOGGERS = ("keeper", "keeper_core", "keeper_train", "keeper_serve")


def configure_logging() -> None:
    """A job's console: keeper's own progress at INFO, every library at WARNING.

    open_clip narrates each model it builds on the root logger at INFO (six lines a load); Ray
    Data, Ray Train and MLflow log through their own handlers and keep their own levels.
    """
    import logging

    logging.basicConfig(format="%(asctime)s %(name)s %(message)s")
    logging.getLogger().setLevel(logging.WARNING)  # also where a handler was already there
    for name in KEEPER_LOGGERS:
        logging.getLogger(name).setLevel(logging.INFO)


def job_main(
    argv: Sequence[str] | None,
    *,
    job: str,
    description: str,
    model: type[C],
    run: Callable[[C], S],
    describe: Callable[[S], str],
    exit_code: Callable[[S], int],
    example: str,
) -> int:
    """``python -m keeper_train.jobs.<job> --config FILE [key=value ...]``: the shared entry point.

    Parses, validates, runs, prints the job's summary. A ``KeeperError`` (a bad config or input)
    prints one line and exits 2; otherwise the exit code is the job's own (``exit_code``).
    """
    import argparse
    import sys

    from keeper_core.errors import KeeperError

    parser = argparse.ArgumentParser(
        prog=f"python -m keeper_train.jobs.{job}", description=description
    )
    shipped = Path(__file__).parents[2] / "configs" / f"{job}.yaml"
    sample = f" (an example: packages/train/configs/{job}.yaml)" if shipped.is_file() else ""
    parser.add_argument("--config", help=f"YAML file of the job's config fields{sample}")
    parser.add_argument("overrides", nargs="*", help=f"key=value, e.g. {example}")
    args = parser.parse_args(argv)
    configure_logging()
    try:
        summary = run(load_config(model, args.config, args.overrides))
    except KeeperError as e:
        print(f"keeper {job.replace('_', '-')}: error: {e}", file=sys.stderr)
        return 2
    print(describe(summary))
    return exit_code(summary)
