"""keeper select: queries the run cannot carry are refused at config time, naming the query.

- A query named as one of the run's own files (``failed.csv``, ``index.html``, ...), in any case:
  its folder OUTPUT/failed.csv/ stopped failed.csv being written, after all the work.
- A ``vlm_query`` of only spaces (stripped to nothing before the judge saw it).
- A VLM question the judge refuses (a special token of its tokenizer, over ``max_query_chars``):
  ``plan`` checks each with the judge's own rules, read from the checkpoint's processor, before
  it reads the table. The actor refuses such a question per row as well, so a mixed-query batch
  never fails as a whole.

No Ray: the actor's callable class runs here, on the tiny random Llava.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from pydantic import ValidationError

from keeper_core.errors import ConfigError
from keeper_core.tiny_vlm import build_tiny_vlm
from keeper_core.vlm import VlmConfig
from keeper_train.jobs import select as S

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_vlm(tmp_path_factory.mktemp("vlm") / "tiny")


# ---------------------------------------------------------------------------------- names


@pytest.mark.parametrize(
    "name",
    ["failed.csv", "FAILED.CSV", "index.html", "Index.HTML", "scored.parquet", "Scored.Parquet"],
)
def test_a_query_named_as_one_of_the_runs_files_is_refused(name: str, tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="the run writes a file of that name"):
        S.Query(name=name, positive=["a beach"])
    with pytest.raises(ValidationError, match=r"failed\.csv"):
        S.SelectJobConfig(table="t", output="o", queries=[{"name": name, "positive": ["a beach"]}])
    listed = tmp_path / "queries.yaml"
    listed.write_text(
        yaml.safe_dump([{"name": "beach", "positive": ["a"]}, {"name": name, "positive": ["b"]}])
    )
    with pytest.raises(ConfigError, match=r"queries\[1\]: name: .*the run writes a file"):
        S.load_queries(str(listed))
    S.Query(name="failed.csv.old", positive=["a beach"])  # only the names themselves


def test_reserved_names_are_the_runs_own_files() -> None:
    from keeper_core.run_lock import LOCK_NAME

    assert {S.SUMMARY, S.FAILED, S.SCORED, S.INDEX, LOCK_NAME} <= set(S.RESERVED_NAMES)


# ------------------------------------------------------------------------------- vlm_query


def test_a_blank_vlm_query_is_refused_and_a_padded_one_is_stripped() -> None:
    for blank in ("", "   ", "\t\n"):
        with pytest.raises(ValidationError, match="vlm_query"):
            S.Query(name="beach", positive=["a beach"], vlm_query=blank)
    q = S.Query(name="beach", positive=["a beach"], vlm_query="  sand and sea  ")
    assert q.vlm_query == q.vlm_text == "sand and sea"


def _cfg(tiny: Path, tmp_path: Path, queries: list[S.Query]) -> S.SelectJobConfig:
    return S.SelectJobConfig(
        table=str(tmp_path / "no-table"),
        output=str(tmp_path / "out"),
        vlm=VlmConfig(source=str(tiny), max_query_chars=40),
        queries=queries,
    )


def test_plan_refuses_a_vlm_question_the_judge_would_refuse_before_reading_the_table(
    tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_table(table: str) -> Any:
        raise AssertionError("the table was read before the queries were checked")

    monkeypatch.setattr(S, "load_candidates", no_table)
    queries = [
        S.Query(name="beach", positive=["a beach"]),
        S.Query(name="logo", positive=["the </s> logo"]),
        S.Query(name="pic", positive=["a dog"], vlm_query="a dog <image> here"),
        S.Query(name="long", positive=["a dog"], vlm_query="d" * 41),
    ]
    with pytest.raises(ConfigError) as refused:
        S.plan(_cfg(tiny, tmp_path, queries))
    message = str(refused.value)
    assert "'beach'" not in message
    assert "query 'logo'" in message
    assert "['</s>']" in message
    assert "query 'pic'" in message
    assert "['<image>']" in message
    assert "query 'long'" in message
    assert "41 characters, more than the limit of 40" in message
    # beta 0 (no VLM stage): nothing is asked of the VLM, nothing refused for it
    cfg = _cfg(tiny, tmp_path, queries)
    cfg.cascade = cfg.cascade.model_copy(update={"beta": 0.0})
    with pytest.raises(AssertionError, match="the table was read"):
        S.plan(cfg)


def test_the_actor_refuses_a_question_for_its_own_rows_only(tiny: Path, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    uris = []
    for i in range(4):
        path = tmp_path / f"{i}.png"
        Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(path)
        uris.append(str(path))
    stage = S.SurvivorStage(VlmConfig(source=str(tiny)), None, threads=1)
    assert torch.get_num_threads() == 1
    batch = {
        "query": np.array([0, 0, 1, 0]),
        "index": np.arange(4),
        "image_uri": np.array(uris, dtype=object),
        "vlm_query": np.array(["a beach", "a beach", "the </s> logo", "a beach"], dtype=object),
    }
    out = stage(batch)
    assert list(out["fatal"]) == [""] * 4
    errors = list(out["error"])
    assert errors[2] == "judge: the VLM question is refused: contains the special token(s) ['</s>']"
    assert errors[0] == errors[1] == errors[3] == ""
    assert np.isnan(out["vlm"][2])
    assert np.isfinite(out["vlm"][[0, 1, 3]]).all()
