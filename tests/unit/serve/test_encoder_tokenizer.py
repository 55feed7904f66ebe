"""The Serve encoder makes its CLIP's tokenizer at start (its text routes need it), where image
work makes it on first use (tests/unit/core/test_tokenizer_lazy.py)."""

from __future__ import annotations

import pytest
from support import register_tiny_variant

from keeper_core.errors import ModelLoadError
from keeper_serve.config import EncoderArgs
from keeper_serve.encoder import ClipEncoder

ARCH = "keeper-tiny-hftok-serve-test"


def test_the_serve_encoder_fails_at_start_on_a_tokenizer_it_cannot_make(tmp_path) -> None:
    """A replica that cannot make it fails to start, not a client's request later."""
    spec = register_tiny_variant(
        tmp_path, ARCH, text_cfg={"hf_tokenizer_name": "keeper/no such tokenizer"}
    )
    load = ClipEncoder.func_or_class._load
    assert load("keeper-tiny:random", EncoderArgs(device="cpu")).embed_dim == 64
    with pytest.raises(ModelLoadError, match="tokenizer"):
        load(spec, EncoderArgs(device="cpu"))
