"""keeper_core.cli: the one ``keeper`` command, its subcommands found through entry points."""

from __future__ import annotations

import argparse
import csv
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from keeper_core import cli
from keeper_core.errors import DataError

SUBCOMMANDS = ("corpus", "embed", "demo")  # keeper-core gives corpus, keeper-train embed and demo


def keeper_exe() -> str:
    return shutil.which("keeper") or str(Path(sys.executable).parent / "keeper")


def test_help_lists_every_installed_packages_commands(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: keeper")
    for name in SUBCOMMANDS:
        assert f"\n    {name} " in out, name
    assert "generate a best-of-series benchmark corpus" in out  # keeper_core's own
    assert "embed an image corpus with CLIP on Ray Data" in out  # from keeper_train


def test_subcommand_help_comes_from_its_package(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        cli.main(["embed", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "usage: keeper embed" in out
    assert "--input" in out
    assert "--batch-size" in out


def test_no_command_prints_help_and_returns_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main([]) == 2
    out = capsys.readouterr().out
    assert "usage: keeper" in out
    assert "corpus" in out


def test_unknown_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        cli.main(["nosuchcommand"])
    assert e.value.code == 2
    assert "invalid choice: 'nosuchcommand'" in capsys.readouterr().err


def test_corpus_writes_a_manifest(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "corpus"
    assert cli.main(["corpus", "--out", str(out), "--series", "2", "--size", "64x48"]) == 0
    manifest = out / "manifest.csv"
    assert capsys.readouterr().out.strip() == str(manifest)
    with manifest.open() as f:
        rows = list(csv.DictReader(f))
    assert {r["series_id"] for r in rows} == {"s00000", "s00001"}
    assert 4 <= len(rows) <= 10  # 2..5 shots per series
    for sid in ("s00000", "s00001"):
        assert [r["is_best"] for r in rows if r["series_id"] == sid].count("1") == 1
    assert all(Path(r["image_uri"]).is_file() for r in rows)


def test_corpus_with_zero_series_returns_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["corpus", "--out", str(tmp_path / "c"), "--series", "0"]) == 2
    err = capsys.readouterr().err
    assert "n_series must be >= 1, got 0" in err
    assert not (tmp_path / "c" / "manifest.csv").exists()


def test_embed_with_a_bad_model_returns_2_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Config validation fails before the job lists inputs or touches Ray. (In a full run the
    # integration tests' session Ray may already be up in this process: compare, don't assume.)
    ray = sys.modules.get("ray")
    ray_was_up = ray is not None and ray.is_initialized()
    argv = ["embed", "--input", str(tmp_path), "--output", str(tmp_path / "o")]
    assert cli.main([*argv, "--model", "NoSuchNet:random"]) == 2
    err = capsys.readouterr().err
    assert "keeper embed: error:" in err
    assert "NoSuchNet" in err
    assert not (tmp_path / "o").exists()
    ray = sys.modules.get("ray")
    assert (ray is not None and ray.is_initialized()) == ray_was_up


class _FakeEntryPoint:
    def __init__(self, name: str, add: Any) -> None:
        self.name = name
        self._add = add

    def load(self) -> Any:
        return self._add


def test_keeper_error_in_a_command_returns_2_with_message(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def add(subparsers: Any) -> None:
        p = subparsers.add_parser("boom", help="always fails")

        def run(args: argparse.Namespace) -> int:
            raise DataError("row 3 is bad", source="m.csv")

        p.set_defaults(func=run)

    def add_ok(subparsers: Any) -> None:
        p = subparsers.add_parser("fine")
        p.set_defaults(func=lambda args: 7)

    eps = [_FakeEntryPoint("fine", add_ok), _FakeEntryPoint("boom", add)]
    monkeypatch.setattr(cli, "entry_points", lambda group: eps if group == cli.GROUP else [])
    assert cli.main(["boom"]) == 2
    assert "keeper boom: error: m.csv: row 3 is bad" in capsys.readouterr().err
    assert cli.main(["fine"]) == 7  # a command's exit code is passed through


def test_non_keeper_errors_are_not_swallowed(monkeypatch: pytest.MonkeyPatch) -> None:
    def add(subparsers: Any) -> None:
        p = subparsers.add_parser("bug")
        p.set_defaults(func=lambda args: 1 // 0)

    monkeypatch.setattr(cli, "entry_points", lambda group: [_FakeEntryPoint("bug", add)])
    with pytest.raises(ZeroDivisionError):
        cli.main(["bug"])


def test_installed_console_script() -> None:
    exe = keeper_exe()
    assert Path(exe).is_file(), f"console script not installed at {exe}"
    proc = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    for name in SUBCOMMANDS:
        assert f"\n    {name} " in proc.stdout, name
    proc = subprocess.run([exe], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "usage: keeper" in proc.stdout
