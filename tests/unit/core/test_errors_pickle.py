"""Every keeper error pickles as itself, attributes included: a Ray task's error reaches the
driver pickled, and one whose __init__ takes several arguments used to fail to unpickle."""

from __future__ import annotations

import pickle

import pytest

from keeper_core.cascade import CascadeStageError
from keeper_core.errors import (
    ConfigError,
    DataError,
    ImageDecodeError,
    KeeperError,
    ModelLoadError,
    StorageError,
)
from keeper_core.storage import TooLargeError

ERRORS: list[KeeperError] = [
    KeeperError("plain"),
    ConfigError("batch_size must be > 0"),
    ModelLoadError("ViT-B-32:/m/w.safetensors", "checkpoint file not found"),
    StorageError("s3://b/k", "no such object", retryable=True),
    TooLargeError("s3://b/k", 10, 12),
    DataError("bad rows", source="s3://b/m.csv", rows=[3, 7]),
    ImageDecodeError("truncated", "ends early", source="/p/a.jpg"),
    CascadeStageError("vlm", "the VLM scorer raised"),
]


@pytest.mark.parametrize("err", ERRORS, ids=lambda e: type(e).__name__)
def test_a_keeper_error_pickles_as_itself(err: KeeperError) -> None:
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is type(err)
    assert str(back) == str(err)
    assert back.args == err.args
    assert vars(back) == vars(err)
