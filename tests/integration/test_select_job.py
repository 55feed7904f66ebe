"""keeper select end to end on a local Ray: a generated corpus embedded by keeper embed
(keeper-tiny:random), the tiny random Llava as the VLM judge, two queries. Every row is accounted
for, the VLM judges only the top-N (its scores checked against the judge run here), an image
deleted after embedding leaves at the vlm stage with its reason, and bad input exits 2."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import yaml

from keeper_core import storage
from keeper_core.images import decode_image
from keeper_core.synthetic import generate_corpus
from keeper_core.tiny_vlm import build_tiny_vlm
from keeper_core.vlm import VlmConfig, load_vlm
from keeper_train.jobs import embed, select

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("one_torch_thread")]
TINY = "keeper-tiny:random"
QUERIES = [
    {"name": "dog", "positive": ["a photo of a dog"], "negative": ["a blurry photo"]},
    {"name": "night-city", "positive": ["a city at night", "street lights"]},
]
PRE_VLM = {"clip", "heuristics", "dedup", "rerank"}


@pytest.fixture(scope="module")
def table(ray_cluster: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """~25 small JPEGs embedded by the embed job into a table."""
    root = tmp_path_factory.mktemp("select")
    manifest = generate_corpus(root / "corpus", n_series=8, seed=11, image_size=(96, 72))
    dst = str(root / "table")
    summary = embed.run(
        embed.EmbedConfig(
            input=str(manifest), output=dst, model=TINY, batch_size=16, ray_address=ray_cluster
        )
    )
    assert summary.status == "ok"
    assert summary.counts.embedded >= 20
    return dst


@pytest.fixture(scope="module")
def tiny_vlm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_vlm(tmp_path_factory.mktemp("select-vlm") / "tiny")


def config(table: str, out: Path, **extra: Any) -> dict[str, Any]:
    return {
        "table": table,
        "output": str(out),
        "queries": QUERIES,
        # Random-weight embeddings of 8 bursts are close: 0.99 still merges some, leaves > 5.
        "cascade": {"top_n": 5, "top_k": 3, "dedup_threshold": 0.99},
        "vlm": {"source": None},
        **extra,
    }


def test_select_judges_only_the_top_n_and_accounts_for_every_row(
    ray_cluster: str, table: str, tiny_vlm: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    queries = tmp_path / "queries.yaml"  # the file form of `queries`
    queries.write_text(yaml.safe_dump(QUERIES))
    cfg = select.SelectJobConfig.model_validate(
        config(
            table,
            out,
            queries=str(queries),
            vlm={"source": str(tiny_vlm), "max_batch": 4},
            batch_size=4,
            ray_address=ray_cluster,
        )
    )
    rows = storage.read_parquet(storage.join(table, embed.EMBEDDINGS)).to_pandas()
    # The plan is deterministic: choose an image the VLM will be asked about, and delete it.
    plan = select.plan(cfg)
    assert [len(q.survivors) for q in plan.queries] == [5, 5]
    victim = int(plan.queries[0].survivors[1])
    victim_uri = plan.candidates.image_uri[victim]
    Path(victim_uri).unlink()

    summary = select.run(cfg)

    assert summary.status == "ok"
    assert summary.clip_model == TINY
    assert summary.clip_random_weights
    assert summary.logit_scale_source == "model"
    assert summary.logit_scale == pytest.approx(1 / 0.07, rel=1e-4)  # open_clip's init
    assert summary.vlm is not None
    assert summary.vlm_random_weights is True
    # top_n for each of the two queries, no more, less the deleted image where it reached the VLM
    # (a candidate the VLM could not judge is not a call)
    reached_vlm = sum(victim in q.survivors.tolist() for q in plan.queries)
    assert summary.totals["vlm_calls"] == 10 - reached_vlm
    judge = load_vlm(VlmConfig(source=str(tiny_vlm)))
    failed = pd.read_csv(summary.outputs["failed"])
    for qi, q in enumerate(summary.queries):
        scored = storage.read_parquet(q.outputs["scored"]).to_pandas()
        # Every table row once, in table order; counts add up overall and per stage.
        assert len(scored) == len(rows) == q.rows
        assert scored["index"].tolist() == list(range(len(rows)))
        assert sorted(scored["image_uri"]) == sorted(rows["image_uri"])
        assert q.picked + q.dropped == q.rows
        assert q.lost == 0
        assert q.stages[0].n_in == q.rows
        for a, b in zip(q.stages, q.stages[1:], strict=False):
            assert b.n_in == a.n_kept
        assert all(s.n_in == s.n_kept + s.n_dropped for s in q.stages)
        assert scored["dropped_at"].isna().sum() == q.picked == 3
        picks = scored[scored["pick_rank"].notna()].sort_values("pick_rank")
        assert picks["pick_rank"].tolist() == [1, 2, 3]
        assert picks["index"].tolist() == [p.index for p in q.picks]
        assert (np.diff(picks["final"].to_numpy()) <= 0).all()

        # The VLM saw exactly the top-N: the rows that reached stage 5.
        reached = scored[~scored["dropped_at"].isin(PRE_VLM)]
        assert set(reached["index"]) == set(plan.queries[qi].survivors.tolist())
        assert len(reached) == 5
        lost_here = reached["index"] == victim
        assert q.vlm_calls == len(reached) - lost_here.sum()
        assert scored["vlm"].notna().sum() == len(reached) - lost_here.sum()
        assert scored.loc[scored["vlm"].notna(), "dropped_at"].isna().sum() == 3
        judged = reached[~lost_here]
        images = [decode_image(Path(u).read_bytes()) for u in judged["image_uri"]]
        vlm_text = select.Query.model_validate(QUERIES[qi]).vlm_text
        expect = judge.relevance(images, vlm_text)
        np.testing.assert_allclose(judged["vlm"], expect, atol=1e-4)
        np.testing.assert_allclose(
            judged["final"], 0.5 * judged["clip"] + 0.5 * judged["vlm"], atol=1e-9
        )

        if lost_here.any():  # the deleted image: gone at the vlm stage, with its reason
            row = scored.set_index("index").loc[victim]
            assert row["dropped_at"] == "vlm"
            assert row["reason"].startswith("vlm_failed: unreadable")
            assert q.vlm_failed == 1
            assert ((failed["query"] == q.name) & (failed["image_uri"] == victim_uri)).sum() == 1
        page = Path(q.outputs["html"]).read_text()
        assert TINY in page
        assert str(tiny_vlm) in page
        assert "Random CLIP weights" in page
        assert "Random VLM weights" in page
        # each judged image once: a pick's card, the other judged rows' thumbnails
        assert page.count("data:image/jpeg;base64,") == len(reached) - lost_here.sum()
    assert summary.queries[0].vlm_failed == 1  # the victim was the first query's

    on_disk = json.loads((out / select.SUMMARY).read_text())
    assert [q["name"] for q in on_disk["queries"]] == ["dog", "night-city"]
    assert on_disk["queries"][1]["negative"] == ["a photo"]  # the anchor stands in
    assert on_disk["vlm"]["random_weights"] is True


def test_without_a_vlm_every_output_says_so(
    ray_cluster: str, table: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = tmp_path / "select.yaml"
    cfg.write_text(yaml.safe_dump(config(table, tmp_path / "out", ray_address=ray_cluster)))
    assert select.main(["--config", str(cfg), "cascade.top_k=2"]) == 0
    assert "keeper select  OK" in capsys.readouterr().out
    s = json.loads((tmp_path / "out" / select.SUMMARY).read_text())
    assert s["vlm"] is None
    assert "No VLM stage" in s["vlm_note"]
    assert s["totals"]["vlm_calls"] == 0
    assert s["totals"]["picked"] == 4
    q = s["queries"][0]
    assert [st["skipped"] for st in q["stages"] if st["name"] == "vlm"] == [True]
    assert "No VLM stage" in (tmp_path / "out" / "dog" / select.INDEX).read_text()


def test_bad_config_and_bad_tables_exit_2(
    table: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def run(data: dict[str, Any], *overrides: str) -> tuple[int, str]:
        path = tmp_path / "c.yaml"
        path.write_text(yaml.safe_dump(data))
        code = select.main(["--config", str(path), *overrides])
        return code, capsys.readouterr().err

    code, err = run(config(table, tmp_path / "o"), "cascade.top_n=0")
    assert code == 2
    assert "cascade.top_n" in err
    code, err = run(config(table, tmp_path / "o"), "cascade.topn=3")
    assert code == 2
    assert "topn" in err
    code, err = run(
        {**config(table, tmp_path / "o"), "queries": [{"name": "../x", "positive": ["a"]}]}
    )
    assert code == 2
    assert "names the output folder" in err

    code, err = run(config(str(tmp_path / "nowhere"), tmp_path / "o"))
    assert code == 2
    assert "no embedding table" in err

    mixed = storage.read_parquet(storage.join(table, embed.EMBEDDINGS))
    specs = [TINY] * (mixed.num_rows - 1) + ["ViT-B-32:random"]
    mixed = mixed.set_column(
        mixed.schema.get_field_index("model_spec"), "model_spec", pa.array(specs)
    )
    storage.write_parquet(mixed, str(tmp_path / "mixed" / embed.EMBEDDINGS / "part-0.parquet"))
    code, err = run(config(str(tmp_path / "mixed"), tmp_path / "o"))
    assert code == 2
    assert "mixes embeddings of 2 model specs" in err
    assert not (tmp_path / "o").exists()  # nothing written before the input was checked
