"""`make demo`'s last step: one /v1/select over real HTTP with a tiny VLM, accounting printed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from keeper_core.synthetic import generate_corpus
from keeper_serve import select_demo

pytestmark = pytest.mark.integration


def test_select_demo_prints_the_stage_accounting(
    shared_serve: int, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    generate_corpus(tmp_path / "corpus", n_series=6, seed=3)
    argv = ["--out", str(tmp_path), "--candidates", "10", "--top-n", "4", "--top-k", "2"]
    assert select_demo.main([*argv, "--port", str(shared_serve)]) == 0
    printed = capsys.readouterr().out
    answer = json.loads((tmp_path / "select-demo.json").read_text())["answer"]
    assert answer["cost"] == {"candidates": 10, "vlm_calls": answer["cost"]["vlm_calls"],
                              "ms": answer["cost"]["ms"]}  # fmt: skip
    assert 1 <= answer["cost"]["vlm_calls"] <= 4
    for stage in answer["stages"]:
        assert stage["n_in"] == stage["n_kept"] + stage["n_dropped"]
        assert f"{stage['name']:<11} {stage['n_in']:>4} {stage['n_kept']:>5}" in printed
    assert len(answer["picks"]) == answer["stages"][-1]["n_kept"] <= 2
    assert answer["models"]["vlm"]["status"] == "ready"
    assert "the VLM is keeper_core.tiny_vlm's, with random weights" in printed
    assert "model weights are RANDOM (keeper-tiny:random)" in printed
    assert (tmp_path / "tiny-vlm" / "keeper.json").exists()
