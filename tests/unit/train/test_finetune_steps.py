"""The fine-tune job's step: DDP accumulation, loss scale, the lr it logs, checkpoints."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

from keeper_core.heads import series_softmax_loss
from keeper_train import raytrain
from keeper_train.jobs.finetune import (
    accumulation_window,
    backward_batch,
    optimizer_step,
    warmup_cosine,
)


class _Toy(nn.Module):
    """(pixels (N, 3, S, S), mask (B, L), quality) -> scores (B, L), like TunedRankerModel."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 1)

    def forward(
        self, pixels: torch.Tensor, mask: torch.Tensor, quality: torch.Tensor
    ) -> torch.Tensor:
        feats = self.lin(pixels.float().mean(dim=(2, 3))).squeeze(-1)
        x = feats.new_full(mask.shape, float("-inf"))
        x[mask] = feats
        return x


def _batch(
    seed: int, lengths: list[int]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    n = sum(lengths)
    pixels = torch.randint(0, 256, (n, 3, 4, 4), generator=g, dtype=torch.uint8)
    mask = torch.zeros((len(lengths), max(lengths)), dtype=torch.bool)
    for i, k in enumerate(lengths):
        mask[i, :k] = True
    best = torch.tensor([k - 1 for k in lengths])
    return pixels, mask, best, torch.zeros((n, 8))


@pytest.fixture
def process_group(tmp_path: Path) -> Iterator[None]:
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_accumulation_under_ddp_runs_and_gives_the_mean_gradient(process_group: None) -> None:
    """num_workers > 1 with grad_accum > 1: the job entered one DDP no_sync() context twice (once
    for the forward, once for the backward), which fails on the first batch that does not sync."""
    torch.manual_seed(0)
    plain = _Toy()
    ddp = nn.parallel.DistributedDataParallel(_Toy())
    ddp.module.load_state_dict(plain.state_dict())
    batches = [_batch(s, [2, 3, 4]) for s in range(3)]
    for i, b in enumerate(batches):
        last, window = accumulation_window(i, 3, 3)
        backward_batch(ddp, *b, sync=last, scale=1.0 / window, autocast=contextlib.nullcontext)
    # the same gradient as one batch of all nine series (equal batch sizes: mean of means)
    px, mask, best, q = (torch.cat([b[k] for b in batches]) for k in (0, 1, 2, 3))
    series_softmax_loss(plain(px, mask, q), mask, best).backward()
    for a, b in zip(ddp.module.parameters(), plain.parameters(), strict=True):
        assert a.grad is not None
        assert b.grad is not None
        torch.testing.assert_close(a.grad, b.grad)


def test_a_partial_last_window_is_a_mean_not_a_fraction() -> None:
    """5 batches, grad_accum 4: the second step holds one batch, and its gradient must be that
    batch's, not a quarter of it (the job divided every batch by grad_accum)."""
    windows = [accumulation_window(i, 5, 4) for i in range(5)]
    assert windows == [(False, 4), (False, 4), (False, 4), (True, 4), (True, 1)]
    assert [accumulation_window(i, 3, 1) for i in range(3)] == [(True, 1)] * 3
    torch.manual_seed(0)
    model, ref = _Toy(), _Toy()
    ref.load_state_dict(model.state_dict())
    b = _batch(7, [2, 3])
    _, window = accumulation_window(4, 5, 4)
    backward_batch(model, *b, sync=True, scale=1.0 / window, autocast=contextlib.nullcontext)
    series_softmax_loss(ref(b[0], b[1], b[3]), b[1], b[2]).backward()
    for a, r in zip(model.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(a.grad, r.grad)
    with pytest.raises(Exception, match="beyond"):
        accumulation_window(5, 5, 4)


def test_logged_lr_is_the_one_the_epoch_trained_with() -> None:
    """The job logged sched.get_last_lr() after the epoch: the next epoch's lr, so the last epoch
    always showed 0 (the cosine's end) although it trained at a positive lr."""
    model = _Toy()
    opt = torch.optim.AdamW([{"params": model.parameters(), "lr": 1e-2}])
    updates, epochs = 3, 2
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(updates, updates * epochs))
    used = []
    for _ in range(updates * epochs):
        model(*_batch(0, [2])[:2], torch.zeros(2, 8)).logsumexp(1).sum().backward()
        used.append(optimizer_step(opt, sched))
    assert used[:3] == pytest.approx([1e-2 / 3, 2e-2 / 3, 1e-2])  # warm-up, first step at 1/3
    assert used[3] == pytest.approx(1e-2)  # the peak lasts two steps
    assert all(lr > 0 for lr in used)
    assert sched.get_last_lr()[-1] == pytest.approx(0.0)  # what used to be logged for epoch 1


def _save_as_if_on_cuda(obj: object, path: Path) -> None:
    """torch.save with every storage tagged cuda:0, as a GPU worker writes its state.pt."""
    from torch import serialization

    def tagger(o: object) -> str | None:
        device = getattr(o, "device", None)
        return "cuda:0" if device is not None and device.type == "cpu" else None

    serialization.register_package(1, tagger, lambda o, loc: None)
    try:
        torch.save(obj, path)
    finally:
        registry = serialization._package_registry
        registry[:] = [p for p in registry if p[1] is not tagger]


def test_a_gpu_workers_checkpoint_loads_on_a_cpu_driver(tmp_path: Path) -> None:
    """train_head's driver read the last state.pt with torch.load(weights_only=True) alone: a
    state saved by a GPU worker (model and optimizer on cuda) failed on a driver without CUDA."""
    m = _Toy()
    opt = torch.optim.AdamW(m.parameters())
    m(*_batch(1, [2])[:2], torch.zeros(2, 8)).logsumexp(1).sum().backward()
    opt.step()
    path = tmp_path / "state.pt"
    _save_as_if_on_cuda({"model": m.state_dict(), "optimizer": opt.state_dict(), "epoch": 3}, path)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA"):
            torch.load(path, weights_only=True)
    state = raytrain.load_state(path)
    assert state["epoch"] == 3
    assert all(v.device.type == "cpu" for v in state["model"].values())
    fresh = _Toy()
    fresh.load_state_dict(state["model"])
    opt2 = torch.optim.AdamW(fresh.parameters())
    opt2.load_state_dict(state["optimizer"])
    torch.testing.assert_close(fresh.lin.weight, m.lin.weight)
