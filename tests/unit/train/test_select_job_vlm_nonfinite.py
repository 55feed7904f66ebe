"""keeper select: an image the VLM gives no finite score for (NaN: non-finite logits) fails alone.

The survivors pass's callable class runs in this process (no Ray) with a judge that answers NaN
for one image; that image gets an error and no score, the others their scores, and nothing is
fatal. Then the whole job, its Ray Data pass replaced by that class run here: the image leaves
as ``vlm_failed`` with its reason, is listed in failed.csv, and every count adds up.
"""

from __future__ import annotations

import csv
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from support import noise_jpeg, write_unit_rows

from keeper_core.cascade import CascadeConfig, CascadeStageError, QueryRules
from keeper_core.errors import KeeperError
from keeper_core.vlm import VlmConfig
from keeper_train.jobs import select as S

ODD = (50, 40)  # the size of the one image the judge cannot score
N = 8


class NanJudge:
    """Scores each image by its mean red level; NaN for an image of size ``ODD``."""

    dtype = torch.bfloat16

    def __init__(self, fail: KeeperError | None = None) -> None:
        self.calls: list[int] = []
        self.fail = fail

    def relevance(self, images: Sequence[Image.Image], queries: Sequence[str]) -> np.ndarray:
        assert len(images) == len(queries)
        self.calls.append(len(images))
        if self.fail is not None:
            raise self.fail
        return np.array(
            [np.nan if im.size == ODD else np.asarray(im)[..., 0].mean() / 255 for im in images],
            np.float32,
        )


def _photos(folder: Path, n: int, odd: int) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    uris = []
    for i in range(n):
        path = folder / f"p{i}.jpg"
        path.write_bytes(noise_jpeg(i, ODD if i == odd else (64, 48)))
        uris.append(str(path))
    return uris


def _batch(uris: list[str]) -> dict[str, np.ndarray]:
    n = len(uris)
    return {
        "query": np.zeros(n, np.int64),
        "index": np.arange(n, dtype=np.int64),
        "image_uri": np.array(uris, dtype=object),
        "vlm_query": np.array(["a red scene"] * n, dtype=object),
    }


def _stage(judge: NanJudge) -> S.SurvivorStage:
    stage = S.SurvivorStage(None, None)  # no VLM loaded; the fake judges
    stage.judge = judge  # type: ignore[assignment]
    return stage


def test_a_nan_score_is_that_images_error_not_the_batchs(tmp_path: Path) -> None:
    uris = _photos(tmp_path / "photos", 5, odd=2)
    uris[4] = str(tmp_path / "photos" / "gone.jpg")  # unreadable: the existing per-image path
    judge = NanJudge()
    out = _stage(judge)(_batch(uris))
    assert judge.calls == [4]  # one call: the NaN image shared its batch with the others
    assert list(out["fatal"]) == [""] * 5
    err = list(out["error"])
    assert err[2] == (
        "judge: non-finite logits (dtype bfloat16): the VLM gave no finite score for this image"
    )
    assert err[4].startswith("unreadable:")
    assert err[0] == err[1] == err[3] == ""
    score = out["vlm"]
    assert np.isnan(score[[2, 4]]).all()
    assert np.isfinite(score[[0, 1, 3]]).all()
    assert np.ptp(score[[0, 1, 3]]) > 0


def test_a_judge_error_that_is_not_one_images_is_still_fatal(tmp_path: Path) -> None:
    uris = _photos(tmp_path / "photos", 3, odd=1)
    out = _stage(NanJudge(fail=KeeperError("CUDA out of memory")))(_batch(uris))
    assert set(out["fatal"]) == {"judge: CUDA out of memory"}


def _in_process(judge: NanJudge) -> Any:
    """judge_survivors without Ray: the same class over the same rows, answered the same way."""

    def run(p: S.Plan) -> S.Judged:
        rows = [(qi, int(i)) for qi, q in enumerate(p.queries) for i in q.survivors]
        batch = _batch([p.candidates.image_uri[i] for _, i in rows])
        batch["query"] = np.array([q for q, _ in rows], np.int64)
        batch["index"] = np.array([i for _, i in rows], np.int64)
        out = _stage(judge)(batch)
        assert not any(out["fatal"])
        answers = {
            k: (float(v), str(e)) for k, v, e in zip(rows, out["vlm"], out["error"], strict=True)
        }
        return S.Judged(answers, {}, None, len(rows), 0.0)

    return run


def _no_processor(vlm: VlmConfig) -> QueryRules:
    """The plan's query rules without a checkpoint to read them from (the judge is a fake)."""
    return QueryRules(vlm.max_query_chars, ())


def test_the_job_reports_the_image_as_vlm_failed_and_counts_add_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    odd = 3
    uris = _photos(tmp_path / "photos", N, odd=odd)
    write_unit_rows(str(tmp_path / "table"), uris, [f"{i:032x}" for i in range(N)])
    judge = NanJudge()
    monkeypatch.setattr(S, "judge_survivors", _in_process(judge))
    monkeypatch.setattr(S, "vlm_query_rules", _no_processor)
    cfg = S.SelectJobConfig(
        table=str(tmp_path / "table"),
        output=str(tmp_path / "out"),
        vlm=VlmConfig(source=str(tmp_path / "photos")),  # a folder: no processor is read
        queries=[S.Query(name="red", positive=["a red scene"])],
        cascade=CascadeConfig(top_n=N, top_k=3, dedup_threshold=None),
    )
    summary = S.run(cfg)
    assert judge.calls == [N]  # every candidate reached the VLM, in one batch
    assert summary.status == "ok"
    (q,) = summary.queries
    assert (q.rows, q.picked, q.dropped, q.lost) == (N, 3, N - 3, 0)
    assert q.vlm_failed == 1
    assert summary.totals["vlm_failed"] == 1
    assert q.vlm_calls == N - 1  # the failed one counts as not judged
    vlm = next(s for s in q.stages if s.name == "vlm")
    assert (vlm.n_in, vlm.n_kept, vlm.n_dropped) == (N, N - 1, 1)
    for s in q.stages:
        assert s.n_in == s.n_kept + s.n_dropped
    assert q.dropped_by_reason["vlm: vlm_failed"] == 1
    assert odd not in [p.index for p in q.picks]
    reason = (
        "judge: non-finite logits (dtype bfloat16): the VLM gave no finite score for this image"
    )
    with (tmp_path / "out" / S.FAILED).open() as f:
        failed = list(csv.DictReader(f))
    assert failed == [
        {
            "query": "red",
            "index": str(odd),
            "image_uri": uris[odd],
            "stage": "vlm",
            "reason": reason,
        }
    ]
    scored = pq.read_table(tmp_path / "out" / "red" / S.SCORED).to_pylist()
    assert scored[odd]["vlm"] is None
    assert scored[odd]["final"] is None
    assert scored[odd]["reason"] == f"vlm_failed: {reason}"
    assert sum(r["vlm"] is not None for r in scored) == N - 1
    on_disk = json.loads((tmp_path / "out" / S.SUMMARY).read_text())
    assert on_disk["totals"]["lost"] == 0


def test_a_judge_that_scores_no_image_fails_the_job(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """NaN for every image is the model's failure (a dtype that overflows on all of them), not
    a run of images that could not be judged: the job stops, saying so."""
    uris = _photos(tmp_path / "photos", N, odd=-1)
    write_unit_rows(str(tmp_path / "table"), uris, [f"{i:032x}" for i in range(N)])
    judge = NanJudge()
    monkeypatch.setattr(sys.modules[__name__], "ODD", (64, 48))  # every photo is "odd" now
    monkeypatch.setattr(S, "judge_survivors", _in_process(judge))
    monkeypatch.setattr(S, "vlm_query_rules", _no_processor)
    cfg = S.SelectJobConfig(
        table=str(tmp_path / "table"),
        output=str(tmp_path / "out"),
        vlm=VlmConfig(source=str(tmp_path / "photos")),
        queries=[S.Query(name="red", positive=["a red scene"])],
        cascade=CascadeConfig(top_n=N, top_k=3, dedup_threshold=None),
    )
    with pytest.raises(CascadeStageError, match=f"no finite score for any of the {N} images"):
        S.run(cfg)
