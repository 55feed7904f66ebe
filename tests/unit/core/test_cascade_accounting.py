"""The cascade's VLM accounting (vlm_calls counts only judged candidates) and the judge's failure
as one safe line (no remote traceback in what may reach an HTTP client)."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from keeper_core.cascade import (
    STAGES,
    CascadeConfig,
    CascadeResult,
    CascadeStageError,
    VlmScorer,
    VlmScores,
    run_cascade,
)

# What Ray prints for a task that raised: where it ran, the file and line, the source.
REMOTE_TRACEBACK = (
    "ray::ServeReplica:default:VlmJudge.handle_request() (pid=123, ip=192.0.2.2, "
    "actor_id=abc, repr=<VlmJudge object>)\n"
    '  File "/x/y.py", line 8, in relevance\n'
    "    scores = self.model(batch)\n"
    "ValueError: bad batch"
)


def embeddings(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)

    def normed(x: np.ndarray) -> np.ndarray:
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)

    return (
        normed(rng.normal(size=(n, 8))),
        normed(rng.normal(size=(1, 8))),
        normed(rng.normal(size=(1, 8))),
    )


CFG = CascadeConfig(top_n=4, top_k=4, dedup_threshold=None, logit_scale=10.0)


def run(judge: VlmScorer | None, n: int = 10, cfg: CascadeConfig = CFG) -> CascadeResult:
    img, pos, neg = embeddings(n)
    return run_cascade(img, pos, neg, config=cfg, vlm=judge)


# ---------------------------------------------------------------------------------------------
# vlm_calls


@pytest.mark.parametrize("n_failed", [0, 1, 2, 4])
def test_vlm_calls_counts_only_the_candidates_the_judge_judged(n_failed: int) -> None:
    asked: list[list[int]] = []

    def judge(idx: np.ndarray) -> VlmScores:
        asked.append(idx.tolist())
        scores = np.linspace(0.9, 0.1, len(idx))
        failed = {int(i): "image unreadable" for i in idx[:n_failed]}
        scores[:n_failed] = np.nan
        return VlmScores(scores, failed)

    res = run(judge)
    assert len(asked) == 1
    assert len(asked[0]) == 4
    vlm = res.stages[STAGES.index("vlm")]
    assert (vlm.n_in, vlm.n_kept, vlm.n_dropped) == (4, 4 - n_failed, n_failed)
    # The cost unit is a candidate the VLM answered for: a failure was never judged.
    assert res.vlm_calls == 4 - n_failed == vlm.n_kept
    assert res.vlm_calls == int(np.sum(~np.isnan(res.candidates.vlm)))
    assert res.as_dict()["vlm_calls"] == 4 - n_failed
    reasons = [r for r in res.candidates.reason if r and r.startswith("vlm_failed")]
    assert len(reasons) == n_failed


def test_vlm_calls_is_the_whole_budget_for_a_plain_array_judge_and_zero_when_skipped() -> None:
    res = run(lambda idx: np.full(len(idx), 0.5))
    assert res.vlm_calls == 4
    res = run(None)
    assert res.vlm_calls == 0
    res = run(lambda idx: np.full(len(idx), 0.5), cfg=CFG.model_copy(update={"beta": 0.0}))
    assert res.vlm_calls == 0


# ---------------------------------------------------------------------------------------------
# the judge's failure, as a client may see it


class WrappedTaskError(Exception):
    """Shaped like Ray's RayTaskError: str() is the remote traceback, ``cause`` the original."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(REMOTE_TRACEBACK)
        self.cause = cause


def failing(exc: BaseException) -> VlmScorer:
    def judge(idx: np.ndarray) -> np.ndarray:
        raise exc

    return judge


def stage_error(exc: BaseException) -> CascadeStageError:
    with pytest.raises(CascadeStageError) as e:
        run(failing(exc))
    assert e.value.stage == "vlm"
    return e.value


def assert_safe(reason: str) -> None:
    assert "\n" not in reason
    assert 'File "/x/y.py", line 8' not in reason
    assert "(pid=123, ip=192.0.2.2)" not in reason
    assert "192.0.2.2" not in reason
    assert "pid=" not in reason


def test_a_wrapped_remote_error_is_one_line_without_the_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    wrapper = WrappedTaskError(ValueError("bad batch\nsecond line of detail"))
    assert 'File "/x/y.py", line 8' in str(wrapper)
    with caplog.at_level(logging.WARNING, logger="keeper_core.cascade"):
        err = stage_error(wrapper)
    assert_safe(err.cause)
    assert_safe(str(err))
    assert err.cause == "the VLM scorer raised ValueError: bad batch"
    assert err.__cause__ is wrapper  # the full error stays with the exception chain...
    # ... and in the log, at warning, traceback and all.
    records = [r for r in caplog.records if r.name == "keeper_core.cascade"]
    assert len(records) == 1
    assert records[0].levelno == logging.WARNING
    assert records[0].exc_info is not None
    assert records[0].exc_info[1] is wrapper
    assert 'File "/x/y.py", line 8' in caplog.text


def test_an_unwrappable_traceback_keeps_only_its_first_line_without_where_it_ran() -> None:
    err = stage_error(RuntimeError(REMOTE_TRACEBACK))
    assert_safe(err.cause)
    assert err.cause.startswith("the VLM scorer raised RuntimeError: ray::ServeReplica")


def test_nested_wrappers_unwrap_to_the_innermost_error() -> None:
    err = stage_error(WrappedTaskError(WrappedTaskError(KeyError("pixel_values"))))
    assert err.cause == "the VLM scorer raised KeyError: 'pixel_values'"


def test_a_string_cause_is_not_unwrapped_and_a_long_message_is_cut() -> None:
    class Own(Exception):
        cause = "a string, as StorageError and CascadeStageError carry"

    err = stage_error(Own("x" * 5000))
    assert err.cause.startswith("the VLM scorer raised Own: xxx")
    assert err.cause.endswith("...")
    assert len(err.cause) < 300


def test_a_message_less_error_and_a_broken_str_still_name_the_type() -> None:
    assert stage_error(TimeoutError()).cause == "the VLM scorer raised TimeoutError"

    class Broken(Exception):
        def __str__(self) -> str:
            raise RuntimeError("no str")

    assert stage_error(Broken()).cause == "the VLM scorer raised Broken"


def test_a_real_ray_task_error_is_unwrapped() -> None:
    rx = pytest.importorskip("ray.exceptions")  # only the exception classes: no cluster
    # Ray puts "ray::<task>() (pid=..., ip=...)" in place of the traceback's first line.
    tb = 'Traceback (most recent call last):\n  File "/x/y.py", line 8, in f\nValueError: bad batch'
    task_error = rx.RayTaskError(
        "VlmJudge.relevance", tb, ValueError("bad batch"), pid=123, ip="192.0.2.2"
    )
    dual = task_error.as_instanceof_cause()  # what a caller of a failed task catches
    assert "(pid=123, ip=192.0.2.2)" in str(dual)
    for exc in (task_error, dual):
        assert 'File "/x/y.py", line 8' in str(exc)
        err = stage_error(exc)
        assert_safe(err.cause)
        assert err.cause == "the VLM scorer raised ValueError: bad batch"
