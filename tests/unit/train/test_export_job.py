"""keeper_train.jobs.export without a registry: the merge guard refuses a wrong merge (an MHA's
out_proj delta added twice, as peft has been reported to do), a spec that would prepare images
otherwise is refused, the config names a bad output, and the parser keeps flags "not given"."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest
import torch

from keeper_core import registry
from keeper_core.errors import ConfigError, ModelLoadError
from keeper_core.finetune import TunedRanker
from keeper_core.heads import HeadConfig
from keeper_core.ranker import RankerConfig
from keeper_core.tower import TowerConfig
from keeper_train import commands
from keeper_train.config import load_config
from keeper_train.jobs import export

TINY = "keeper-tiny:random"


@pytest.fixture(scope="module")
def lora() -> TunedRanker:
    """A LoRA ranker on keeper-tiny whose adapters do something (peft starts B at zero)."""
    cfg = RankerConfig(
        head=HeadConfig(kind="linear", in_dim=64),
        features="embedding",
        embedding_spec="unsaved",
        embed_dim=64,
        tower=TowerConfig(base_spec=TINY, method="lora", rank=4),
    )
    ranker = TunedRanker.build(cfg, device="cpu")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in ranker.parts.lora.values():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return ranker


def _save(state: dict[str, torch.Tensor]) -> bytes:
    from safetensors.torch import save

    return bytes(save(state))


def test_a_right_merge_passes_and_a_double_merged_out_proj_is_refused(lora: TunedRanker) -> None:
    state = lora.merged_state_dict()
    assert export.verify_merged(lora, _save(state), "keeper-tiny") < 1e-5

    from keeper_core.models import load_clip

    base = load_clip(TINY, "cpu").model.state_dict()
    doubled = dict(state)
    keys = [k for k in state if k.endswith("attn.out_proj.weight") and k.startswith("visual.")]
    assert len(keys) == 2  # both blocks of keeper-tiny are adapted
    for k in keys:
        delta = state[k] - base[k]
        assert float(delta.abs().max()) > 1e-3  # the adapter moved it
        doubled[k] = state[k] + delta
    with pytest.raises(ModelLoadError, match=r"refused, nothing written") as e:
        export.verify_merged(lora, _save(doubled), "keeper-tiny")
    assert "out_proj delta twice" in str(e.value)


def test_probe_pixels_are_fixed_and_cover_the_range() -> None:
    a, b = export.probe_pixels(64), export.probe_pixels(64)
    assert a.shape == (export.PROBE_IMAGES, 3, 64, 64)
    assert a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    assert (a.min(), a.max()) == (0, 255)


def test_a_spec_that_prepares_images_otherwise_is_refused() -> None:
    export.check_preprocessing(TINY, "keeper-tiny:/models/m.safetensors")
    # SigLIP's tags all prepare alike (mean/std 0.5, squash), and so does ARCH:FILE since.
    export.check_preprocessing("ViT-B-16-SigLIP:webli", "ViT-B-16-SigLIP:/m.safetensors")
    # One ViT-L-14 tag prepares with mean and std 0.5; ARCH:FILE takes the config's (CLIP's).
    with pytest.raises(ModelLoadError, match=r"would prepare images as .*mean=\(0\.48"):
        export.check_preprocessing("ViT-L-14:laion2b_s32b_b82k", "ViT-L-14:/m.safetensors")


def test_output_must_fit_the_mode() -> None:
    with pytest.raises(
        ConfigError, match=r"a merged checkpoint is one .*must end in \.safetensors"
    ):
        load_config(export.ExportConfig, None, ["model=m", "output=/x/tuned.pt", "merge=true"])
    with pytest.raises(ConfigError, match=r"without merge the output is a folder"):
        load_config(export.ExportConfig, None, ["model=m", "output=/x/tuned.safetensors"])
    with pytest.raises(ConfigError, match=r"model: Field required"):
        load_config(export.ExportConfig, None, ["output=/x/"])
    cfg = load_config(export.ExportConfig, None, ["model=m", "output=s3://b/ranker/"])
    assert (cfg.merge, cfg.tracking_uri, cfg.data_dir) == (False, None, "keeper-data")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="keeper")
    commands.add_export_parser(parser.add_subparsers(dest="command"))
    return parser


def test_flags_default_to_not_given_and_have_help(capsys: pytest.CaptureFixture[str]) -> None:
    sub = next(a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction))
    for action in sub.choices["export"]._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        assert (action.help or "").strip(), action.dest
        assert action.default is None, action.dest
    with pytest.raises(SystemExit) as e:
        export.main(["--help"])
    assert e.value.code == 0
    assert "usage: keeper export" in capsys.readouterr().out


def test_config_file_flags_and_overrides(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Each is refused by the config check, before any registry is asked.
    cfg = tmp_path / "export.yaml"
    cfg.write_text("model: models:/r@champion\noutput: /x/tuned.pt\n")
    # Only a config and a key=value: the override is not taken for the model URI.
    assert export.main(["--config", str(cfg), "merge=true"]) == 2
    assert "Value error, a merged checkpoint is one .safetensors file" in capsys.readouterr().err
    # A flag wins over the file; a string flag such as `on` stays a string.
    assert export.main(["--config", str(cfg), "--merge", "--output", "on"]) == 2
    assert "output 'on' must end in .safetensors" in capsys.readouterr().err
    assert commands._is_override("tracking_uri=x")
    assert not commands._is_override("models:/r@a=b")


def test_ranker_folder_follows_mlmodel_and_stays_inside(tmp_path: Path) -> None:
    root = tmp_path / "model"
    (root / "artifacts" / "ranker").mkdir(parents=True)
    (root / "artifacts" / "ranker" / "ranker.json").write_text("{}")
    mlmodel = "flavors:\n  python_function:\n    artifacts:\n      ranker:\n        path: {}\n"
    (root / "MLmodel").write_text(mlmodel.format("artifacts/ranker"))
    assert registry.ranker_folder(root) == (root / "artifacts" / "ranker").resolve()
    (root / "MLmodel").write_text(mlmodel.format("../elsewhere"))
    assert registry.ranker_folder(root) is None
    (root / "MLmodel").write_text("flavors: {}\n")
    assert registry.ranker_folder(root) is None
