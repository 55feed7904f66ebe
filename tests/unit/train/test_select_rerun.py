"""keeper select re-run into an OUTPUT an earlier run with other queries wrote: refused, not mixed.

The survivors pass (Ray Data) is replaced by answers made here; everything else is the job's.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from support import write_unit_rows

from keeper_core.errors import ConfigError
from keeper_train.jobs import select as S


def _no_ray(p: S.Plan) -> S.Judged:
    answers = {
        (qi, int(i)): (float("nan"), "") for qi, q in enumerate(p.queries) for i in q.survivors
    }
    return S.Judged(answers, {}, None, len(answers), 0.0)


def _cfg(tmp_path: Path, names: list[str]) -> S.SelectJobConfig:
    return S.SelectJobConfig(
        table=str(tmp_path / "table"),
        output=str(tmp_path / "out"),
        vlm=None,
        queries=[S.Query(name=n, positive=[f"a photo of {n}"]) for n in names],
    )


def test_select_rerun_with_other_queries_is_refused_not_mixed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    n, table = 30, tmp_path / "table"
    uris = [str(table / f"missing/{i}.jpg") for i in range(n)]
    write_unit_rows(str(table), uris, [f"{i:032x}" for i in range(n)])
    monkeypatch.setattr(S, "judge_survivors", _no_ray)
    out = tmp_path / "out"
    first = S.run(_cfg(tmp_path, ["beach", "dogs"]))
    assert all(q.rows == q.picked + q.dropped for q in first.queries)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}

    # The same command again (a re-run after a kill): runs, and rewrites the same files.
    again = S.run(_cfg(tmp_path, ["beach", "dogs"]))
    assert [q.name for q in again.queries] == ["beach", "dogs"]

    # Other queries into the same output: refused before any work, nothing written.
    with pytest.raises(ConfigError, match=r"dogs/(scored\.parquet|index\.html)"):
        S.run(_cfg(tmp_path, ["beach", "cats"]))
    assert not (out / "cats").exists()
    summary = json.loads((out / S.SUMMARY).read_text())
    assert [q["name"] for q in summary["queries"]] == ["beach", "dogs"]
    assert {p for p in out.rglob("*") if p.is_file()} == set(before)

    # Once the old query's results are gone, the new set runs; only its folders are there.
    for f in (out / "dogs").iterdir():
        f.unlink()
    (out / "dogs").rmdir()
    S.run(_cfg(tmp_path, ["beach", "cats"]))
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["beach", "cats"]


def test_select_other_files_in_output_are_not_taken_for_queries(tmp_path: Path) -> None:
    out = tmp_path / "out"
    (out / "_runs").mkdir(parents=True)
    (out / "_runs" / S.INDEX).write_text("not a query")
    (out / "notes" / "deep").mkdir(parents=True)
    (out / "notes" / "deep" / S.SCORED).write_bytes(b"")
    S.refuse_other_queries(str(out), [S.Query(name="beach", positive=["x"])])
    S.refuse_other_queries(str(tmp_path / "nothing-there"), [S.Query(name="b", positive=["x"])])
