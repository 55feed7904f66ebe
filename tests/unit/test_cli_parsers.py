"""``keeper`` refuses a user's mistake in one line with exit 2, and accepts what is valid.

key=value overrides may follow the flags (keeper_core.cli.KeeperParser); a binary index.json
is a DataError, not a UnicodeDecodeError; ``keeper corpus`` checks --out, --size and --photos
itself.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
from support import write_unit_rows

from keeper_core.cli import build_parser, main
from keeper_core.errors import DataError
from keeper_core.vector_index import VectorIndex


def parse(argv: list[str]) -> dict[str, object]:
    return {k: v for k, v in vars(build_parser().parse_args(argv)).items() if k != "func"}


@pytest.mark.parametrize(
    ("after", "before"),
    [
        (
            ["export", "models:/r@champion", "--output", "xo", "merge=false"],
            ["export", "models:/r@champion", "merge=false", "--output", "xo"],
        ),
        (
            ["export", "--output", "xo", "models:/r@champion", "--merge", "data_dir=d"],
            ["export", "models:/r@champion", "data_dir=d", "--output", "xo", "--merge"],
        ),
        (
            ["reference", "add", "ana", "--input", "in/", "--root", "refs", "embed.batch_size=2"],
            ["reference", "add", "ana", "embed.batch_size=2", "--input", "in/", "--root", "refs"],
        ),
        (
            ["embed", "--input", "in/", "decoder=pil", "--output", "out/", "batch_size=4"],
            ["embed", "--input", "in/", "--output", "out/", "decoder=pil", "batch_size=4"],
        ),
    ],
)
def test_overrides_after_the_flags_parse_as_before_them(
    after: list[str], before: list[str]
) -> None:
    assert parse(after) == parse(before)


def test_the_first_bare_word_that_is_not_key_value_is_the_model() -> None:
    from keeper_train.commands import _split_words

    words = parse(["export", "merge=false", "--output", "xo", "models:/r@a", "data_dir=d"])
    assert words["words"] == ["merge=false", "models:/r@a", "data_dir=d"]
    assert _split_words(["merge=false", "models:/r@a", "data_dir=d"]) == (
        "models:/r@a",
        ["merge=false", "data_dir=d"],
    )
    assert _split_words(["merge=true"]) == (None, ["merge=true"])  # `--config F key=value`
    assert _split_words([]) == (None, [])


def test_an_unknown_flag_is_still_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["export", "models:/r@a", "--output", "xo", "--bogus", "merge=false"])
    assert e.value.code == 2
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err


def test_overrides_after_the_flags_reach_the_config(capsys: pytest.CaptureFixture[str]) -> None:
    # Refused by the config check (an unknown field), before any registry or Ray is touched:
    # the words after the flags got as far as the job's config.
    argv = ["export", "models:/r@a", "--output", "xo", "merge=false", "nosuch=1"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("keeper export: error:")
    assert "nosuch" in err
    argv = ["reference", "add", "ana", "--input", "i", "--root", "r", "embed.batch_size=2", "x=1"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("keeper reference: error:")
    assert "x: Extra inputs" in err


# ------------------------------------------------------------------ a binary index.json


@pytest.mark.parametrize("content", [b"\xff\xfe\x00", b"\x89PNG\r\n\x1a\n\x00\x00", b"{not json"])
def test_an_index_json_that_is_not_json_is_a_data_error(tmp_path: Path, content: bytes) -> None:
    (tmp_path / "index.json").write_bytes(content)
    with pytest.raises(DataError, match="not JSON") as e:
        VectorIndex.load(str(tmp_path))
    assert str(tmp_path / "index.json") in str(e.value)


def test_keeper_dedup_with_a_binary_index_json_exits_2_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    n = 4
    table = str(tmp_path / "table")
    write_unit_rows(
        table, [f"/photos/{i}.jpg" for i in range(n)], [f"id-{i}" for i in range(n)], dim=16
    )
    index = tmp_path / "index"
    index.mkdir()
    (index / "index.json").write_bytes(b"\xff\xd8\xff\xe0\x00\x10JFIF\x00")
    argv = ["dedup", "--table", str(tmp_path / "table"), "--output", str(tmp_path / "out")]
    assert main([*argv, "--index", str(index)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err
    assert err.startswith("keeper dedup: error:")
    assert f"{index / 'index.json'}: not JSON" in err


# ------------------------------------------------------------------ keeper corpus


def test_corpus_out_on_a_file_exits_2_naming_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a_file = tmp_path / "f"
    a_file.write_text("")
    for out in (a_file, a_file / "sub"):
        assert main(["corpus", "--out", str(out), "--series", "1"]) == 2
        err = capsys.readouterr().err.strip()
        assert err == f"keeper corpus: error: out_dir must be a folder, but {a_file} is a file"
    assert a_file.read_text() == ""


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--size", "3"], "argument --size: must look like 320x240, got '3'"),
        (["--size", "axb"], "argument --size: must look like 320x240, got 'axb'"),
        (["--photos", "coffee", "nope"], "argument --photos: invalid choice: 'nope'"),
        (["--series", "x"], "argument --series: invalid int value: 'x'"),
    ],
)
def test_corpus_bad_flags_are_keeper_corpus_usage_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    with pytest.raises(SystemExit) as e:
        main(["corpus", "--out", str(tmp_path / "c"), *argv])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: keeper corpus ")
    assert "python -m keeper_core.synthetic" not in err
    assert "--jpeg-quality" not in err  # a flag keeper corpus does not have
    assert f"keeper corpus: error: {message}" in err
    assert not (tmp_path / "c").exists()


def test_corpus_valid_size_and_photos_parse() -> None:
    args = build_parser().parse_args(
        ["corpus", "--out", "c", "--size", "64x48", "--photos", "coffee", "all"]
    )
    assert args.size == (64, 48)
    assert args.photos == ["coffee", "all"]


def test_corpus_parser_does_not_import_numpy() -> None:
    # `keeper --help` stays light: the size parser and photo names load only when given.
    import subprocess
    import sys

    code = (
        "import sys\nfrom keeper_core.cli import build_parser\nbuild_parser()\n"
        "print('keeper_core.synthetic' in sys.modules)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"


def test_keeper_parser_leaves_parsers_without_a_star_positional_alone() -> None:
    from keeper_core.cli import KeeperParser

    p = KeeperParser(prog="x")
    p.add_argument("name")
    p.add_argument("--flag")
    ns, extras = p.parse_known_args(["a", "--flag", "f", "b"])
    assert (ns.name, extras) == ("a", ["b"])
    assert isinstance(ns, argparse.Namespace)
