"""Ranking heads and losses: padding never leaks, losses match hand values, heads learn."""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from keeper_core.errors import DataError
from keeper_core.heads import (
    HeadConfig,
    SeriesTransformerHead,
    make_head,
    pad_series,
    pairwise_logistic_loss,
    series_softmax_loss,
)

KINDS = ["linear", "mlp", "transformer"]
D = 12


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    # Tiny models: intra-op threads only add contention on a shared 2-core machine.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def head(kind: str, dropout: float = 0.1) -> torch.nn.Module:
    torch.manual_seed(0)
    return make_head(HeadConfig(kind=kind, in_dim=D, hidden=32, layers=2, dropout=dropout))


def ragged(lengths: list[int], seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, D, generator=g) for n in lengths]


# --- pad_series --------------------------------------------------------------------------------


def test_pad_series_shapes_values_and_mask() -> None:
    a, b = np.arange(6, dtype=np.float64).reshape(2, 3), torch.ones(3, 3)
    x, mask = pad_series([a, b])
    assert x.dtype == torch.float32
    assert x.shape == (2, 3, 3)
    assert mask.tolist() == [[True, True, False], [True, True, True]]
    assert x[0, :2].tolist() == a.tolist()
    assert x[0, 2].tolist() == [0, 0, 0]
    assert x[1].tolist() == b.tolist()


@pytest.mark.parametrize(
    ("series", "match"),
    [
        ([], "at least one series"),
        ([torch.ones(2, 3), torch.ones(2, 4)], r"one D \(3\); bad: 1: \(2, 4\)"),
        ([torch.ones(2, 3), torch.ones(0, 3)], r"bad: 1: \(0, 3\)"),
        ([torch.ones(3)], r"bad: 0: \(3,\)"),
    ],
)
def test_pad_series_validation(series: list[torch.Tensor], match: str) -> None:
    with pytest.raises(DataError, match=match):
        pad_series(series)


# --- heads -----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_padding_never_leaks_into_scores(kind: str) -> None:
    model = head(kind).eval()
    series = ragged(list(range(2, 9)))
    x, mask = pad_series(series)
    with torch.no_grad():
        batched = model(x, mask)
        for i, s in enumerate(series):
            alone = model(s[None], torch.ones(1, len(s), dtype=torch.bool))[0]
            torch.testing.assert_close(batched[i, : len(s)], alone, atol=1e-5, rtol=0)
            assert torch.isneginf(batched[i, len(s) :]).all()
        # Garbage (huge values, NaN) in padded positions changes nothing.
        garbage = x.clone()
        garbage[~mask] = float("nan")
        garbage[~mask & (torch.arange(8) % 2 == 0)] = 1e6
        torch.testing.assert_close(model(garbage, mask), batched, atol=0, rtol=0)
    assert torch.softmax(batched, dim=1)[~mask].eq(0).all()


@pytest.mark.parametrize("kind", KINDS)
def test_scores_are_permutation_equivariant(kind: str) -> None:
    model = head(kind).eval()
    x = torch.randn(3, 6, D)
    mask = torch.ones(3, 6, dtype=torch.bool)
    perm = torch.randperm(6)
    with torch.no_grad():
        torch.testing.assert_close(
            model(x[:, perm], mask), model(x, mask)[:, perm], atol=1e-5, rtol=0
        )


@pytest.mark.parametrize(
    ("kind", "attends"), [("linear", False), ("mlp", False), ("transformer", True)]
)
def test_only_the_transformer_lets_images_see_each_other(kind: str, attends: bool) -> None:
    model = head(kind).eval()
    x = torch.randn(1, 4, D)
    mask = torch.ones(1, 4, dtype=torch.bool)
    changed = x.clone()
    changed[0, 3] += 5.0
    with torch.no_grad():
        delta = (model(changed, mask) - model(x, mask))[0, :3].abs().max().item()
    assert (delta > 1e-3) == attends


@pytest.mark.parametrize("kind", KINDS)
def test_padded_inputs_get_zero_gradient(kind: str) -> None:
    model = head(kind).train()
    x, mask = pad_series(ragged([2, 5, 3]))
    x[~mask] = float("nan")
    x.requires_grad_(True)
    loss = series_softmax_loss(model(x, mask), mask, torch.tensor([1, 4, 0]))
    loss.backward()
    assert x.grad is not None
    assert torch.isfinite(x.grad).all()
    assert x.grad[~mask].eq(0).all()
    assert x.grad[mask].abs().sum() > 0
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_forward_checks_shapes() -> None:
    model = head("linear")
    with pytest.raises(DataError, match="bool mask"):
        model(torch.zeros(2, 3, D), torch.ones(2, 3))
    with pytest.raises(DataError, match=r"x \(B, L, D\)"):
        model(torch.zeros(3, D), torch.ones(3, dtype=torch.bool))


@pytest.mark.parametrize("kind", KINDS)
def test_heads_learn_a_marked_best_image(kind: str) -> None:
    # The best image of each series has feature 0 at 2; the others at most 1: separable.
    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(2, 9, (96,), generator=g).tolist()
    series = ragged(lengths, seed=2)
    best = torch.tensor([int(torch.randint(n, (1,), generator=g)) for n in lengths])
    for s, b in zip(series, best.tolist(), strict=True):
        s[:, 0] = torch.rand(len(s), generator=g) * 2 - 1
        s[b, 0] = 2.0
    x, mask = pad_series(series)
    model = head(kind, dropout=0.0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(150):
        opt.zero_grad()
        series_softmax_loss(model(x, mask), mask, best).backward()
        opt.step()
    with torch.no_grad():
        top1 = (model.eval()(x, mask).argmax(1) == best).float().mean().item()
    assert top1 == 1.0


# --- losses ------------------------------------------------------------------------------------

NEG = float("-inf")


def test_series_softmax_loss_by_hand() -> None:
    scores = torch.tensor([[1.0, 2.0, NEG], [0.0, 0.0, 0.0]])
    mask = torch.tensor([[True, True, False], [True, True, True]])
    loss = series_softmax_loss(scores, mask, torch.tensor([1, 0]))
    expected = (math.log(1 + math.exp(-1)) + math.log(3)) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)

    dist = torch.tensor([[0.25, 0.75, 0.0], [0.5, 0.5, 0.0]])
    log_p0 = [1 - math.log(math.e + math.e**2), 2 - math.log(math.e + math.e**2)]
    expected = (-(0.25 * log_p0[0] + 0.75 * log_p0[1]) + math.log(3)) / 2
    loss = series_softmax_loss(scores, mask, dist)
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_series_softmax_loss_ignores_padded_scores_and_one_hot_equals_index() -> None:
    scores = torch.tensor([[0.3, -1.0, 123.0], [2.0, 0.5, 1.0]], requires_grad=True)
    mask = torch.tensor([[True, True, False], [True, True, True]])
    target = torch.tensor([0, 2])
    by_index = series_softmax_loss(scores, mask, target)
    one_hot = torch.nn.functional.one_hot(target, 3).float()
    torch.testing.assert_close(series_softmax_loss(scores, mask, one_hot), by_index)
    by_index.backward()
    assert scores.grad is not None
    assert scores.grad[0, 2] == 0


@pytest.mark.parametrize(
    ("target", "match"),
    [
        (torch.tensor([2, 0]), r"on padding in rows \[0\]"),
        (torch.tensor([0, 3]), r"out of range or on padding in rows \[1\]"),
        (torch.tensor([[0.5, 0.4, 0.0], [1.0, 0.0, 0.0]]), r"sum to 1.*rows \[0\]"),
        (torch.tensor([[0.5, 0.0, 0.5], [1.0, 0.0, 0.0]]), r"0 on padding; bad rows \[0\]"),
        (torch.tensor([[1.5, -0.5, 0.0], [1.0, 0.0, 0.0]]), r">= 0.*rows \[0\]"),
        (torch.tensor([0.0, 1.0]), "target must be"),
    ],
)
def test_series_softmax_loss_validation(target: torch.Tensor, match: str) -> None:
    mask = torch.tensor([[True, True, False], [True, True, True]])
    with pytest.raises(DataError, match=match):
        series_softmax_loss(torch.zeros(2, 3), mask, target)


def test_pairwise_logistic_loss_by_hand() -> None:
    scores = torch.tensor([[1.0, 2.0, NEG], [0.0, 1.0, 3.0]], requires_grad=True)
    mask = torch.tensor([[True, True, False], [True, True, True]])
    loss = pairwise_logistic_loss(scores, mask, torch.tensor([1, 2]))
    expected = (
        sum(math.log1p(math.exp(other - best)) for best, other in [(2, 1), (3, 0), (3, 1)]) / 3
    )
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    assert scores.grad is not None
    assert torch.isfinite(scores.grad).all()
    assert scores.grad[0, 2] == 0


def test_pairwise_logistic_loss_validation() -> None:
    mask = torch.tensor([[True, False]])
    with pytest.raises(DataError, match="no \\(best, other\\) pairs"):
        pairwise_logistic_loss(torch.zeros(1, 2), mask, torch.tensor([0]))
    with pytest.raises(DataError, match="on padding"):
        pairwise_logistic_loss(torch.zeros(1, 2), mask, torch.tensor([1]))
    with pytest.raises(DataError, match="target_index must be int"):
        pairwise_logistic_loss(torch.zeros(1, 2), mask, torch.tensor([0.0]))


# --- config ------------------------------------------------------------------------------------


def test_make_head_builds_each_kind() -> None:
    assert isinstance(make_head(HeadConfig(kind="transformer", in_dim=8)), SeriesTransformerHead)
    mlp = make_head(HeadConfig(kind="mlp", in_dim=8, hidden=16, layers=3))
    n_linear = sum(isinstance(m, torch.nn.Linear) for m in mlp.modules())
    assert n_linear == 4  # 3 hidden layers + the score layer
    linear = make_head(HeadConfig(kind="linear", in_dim=8))
    assert sum(p.numel() for p in linear.parameters()) == 9


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"kind": "gru", "in_dim": 8}, "kind"),
        ({"kind": "mlp", "in_dim": 0}, "in_dim"),
        ({"kind": "mlp", "in_dim": 8, "layers": 0}, "layers"),
        ({"kind": "mlp", "in_dim": 8, "dropout": 1.0}, "dropout"),
        ({"kind": "mlp", "in_dim": 8, "hiden": 3}, "hiden"),
        ({"kind": "transformer", "in_dim": 8, "hidden": 30, "heads": 4}, "divisible by heads"),
    ],
)
def test_config_validation(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(ValidationError, match=field):
        HeadConfig(**kwargs)  # type: ignore[arg-type]
