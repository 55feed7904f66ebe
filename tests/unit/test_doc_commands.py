"""Every keeper command shown in README.md and docs/ is one keeper accepts.

A user copies the documented commands first. Each ``keeper ...`` line in a fenced shell block is
parsed by the real ``keeper`` parser, and each ``python -m keeper_train.jobs.<job> --config FILE
key=value ...`` line is checked against the job's config model: the file exists and every key is a
field (the flag-style jobs, demo, evaluate and promote, are parsed as their ``keeper`` verb). (The commands that need a cluster, an API server or real weights are run for real where
they can be: tests/integration/test_job_submit.py, test_serve*.py, test_demo.py.)
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from keeper_core.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)\s*$")


def shell_commands(path: Path) -> list[tuple[int, str]]:
    """(line number, command) for each command in the file's bash/sh fenced blocks."""
    out: list[tuple[int, str]] = []
    lang, start, pending = None, 0, ""
    for no, line in enumerate(path.read_text().splitlines(), 1):
        m = FENCE.match(line)
        if m:
            lang = None if lang is not None else (m.group(1) or "text")
            continue
        if lang not in ("bash", "sh", "shell"):
            continue
        text = line.split(" # ")[0].rstrip() if not line.lstrip().startswith("#") else ""
        if not pending:
            start = no
        pending += text.rstrip("\\") + " "
        if not text.endswith("\\") and _complete(pending):
            if pending.strip():
                out.append((start, pending.strip()))
            pending = ""
    return out


def _complete(command: str) -> bool:
    """False while a quoted argument (e.g. a JSON runtime env) runs on to the next line."""
    try:
        shlex.split(command)
    except ValueError:
        return False
    return True


def keeper_argv(command: str) -> list[str] | None:
    """The argv after ``keeper`` for a keeper command line, else None."""
    words = shlex.split(command)
    for i, w in enumerate(words):
        # "keeper" right after a flag is that flag's value (benchmarks' --servers keeper)
        value = i > 0 and words[i - 1].startswith("-")
        if w.endswith("/keeper") or (w == "keeper" and not value):
            return _without_optional(words[i + 1 :])
    return None


def _without_optional(words: list[str]) -> list[str]:
    """A usage synopsis marks optional parts as ``[--flag VALUE]``: drop those words (quoted
    arguments stay one word each)."""
    out, depth = [], 0
    for w in words:
        opens = w.startswith("[")
        depth += opens
        if depth == 0:
            out.append(w)
        if w.endswith("]") and depth:
            depth -= 1
    return out


def job_argv(command: str) -> tuple[str, list[str]] | None:
    """(job name, its argv) for a ``python -m keeper_train.jobs.<job>`` line, else None."""
    words = shlex.split(re.sub(r"\[[^\]]*\]", "", command))
    for i, w in enumerate(words[:-1]):
        if w == "-m" and words[i + 1].startswith("keeper_train.jobs."):
            return words[i + 1].rsplit(".", 1)[1], words[i + 2 :]
    return None


COMMANDS = [(p, no, c) for p in DOCS for no, c in shell_commands(p)]
KEEPER = [(f"{p.name}:{no}", a) for p, no, c in COMMANDS if (a := keeper_argv(c)) is not None]
JOBS = [(f"{p.name}:{no}", j) for p, no, c in COMMANDS if (j := job_argv(c)) is not None]


def test_the_docs_show_keeper_commands() -> None:
    assert len(KEEPER) >= 10
    assert {j for _, (j, _) in JOBS} >= {"embed", "train_head", "pick", "finetune", "select"}


@pytest.mark.parametrize(("where", "argv"), KEEPER, ids=[w for w, _ in KEEPER])
def test_documented_keeper_command_parses(where: str, argv: list[str]) -> None:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        pytest.fail(f"{where}: `keeper {' '.join(argv)}` does not parse (exit {e.code})")
    assert getattr(args, "func", None), f"{where}: `keeper {' '.join(argv)}` names no command"


@pytest.mark.parametrize(("where", "job"), JOBS, ids=[w for w, _ in JOBS])
def test_documented_job_command_names_real_fields(where: str, job: tuple[str, list[str]]) -> None:
    from keeper_train.jobs.ab_report import ABReportConfig
    from keeper_train.jobs.embed import EmbedConfig
    from keeper_train.jobs.feedback_export import FeedbackExportConfig
    from keeper_train.jobs.finetune import FinetuneConfig
    from keeper_train.jobs.pick import PickJobConfig
    from keeper_train.jobs.select import SelectJobConfig
    from keeper_train.jobs.train_head import TrainHeadConfig

    name, argv = job
    models = {
        "embed": EmbedConfig,
        "train_head": TrainHeadConfig,
        "pick": PickJobConfig,
        "finetune": FinetuneConfig,
        "select": SelectJobConfig,
        "feedback_export": FeedbackExportConfig,
        "ab_report": ABReportConfig,
    }
    if name not in models:  # demo, evaluate, promote: `python -m` runs `keeper <verb>` flags
        verb = name.replace("_", "-")
        try:
            build_parser().parse_args([verb, *argv])
        except SystemExit as e:
            pytest.fail(f"{where}: `python -m keeper_train.jobs.{name}` flags do not parse ({e})")
        return
    model = models[name]
    fields = set(model.model_fields) | {
        f.alias for f in model.model_fields.values() if f.alias is not None
    }
    words = iter(argv)
    for w in words:
        if w == "--config":
            config = next(words)
            assert (ROOT / config).is_file(), f"{where}: no config file {config}"
        elif "=" in w and not w.startswith("-"):
            key = w.split("=", 1)[0].split(".")[0]  # grouping.max_gap_s: a nested field
            assert key in fields, f"{where}: {name} has no field {key!r}"
        elif w.startswith("-") and w not in ("--json",):
            pytest.fail(f"{where}: {name} takes --config, --json and key=value, not {w}")
