"""keeper_train.config: YAML + key=value overrides, validated by a pydantic model (no Ray)."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import BaseModel, ConfigDict

from keeper_core.errors import ConfigError, KeeperError
from keeper_train.config import load_config, parse_overrides
from keeper_train.jobs.embed import EmbedConfig

SHIPPED = Path(__file__).parents[3] / "packages" / "train" / "configs" / "embed.yaml"


class Small(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    n: int = 1
    ratio: float = 0.5
    flag: bool = False
    opt: str | None = "x"


# ---------------------------------------------------------------- parse_overrides


def test_overrides_parse_yaml_scalars() -> None:
    got = parse_overrides(
        ["n=3", "ratio=0.25", "neg=-7", "flag=true", "off=False", "opt=null", "name=hello"]
    )
    assert got == {
        "n": 3,
        "ratio": 0.25,
        "neg": -7,
        "flag": True,
        "off": False,
        "opt": None,
        "name": "hello",
    }
    assert type(got["n"]) is int
    assert type(got["ratio"]) is float


def test_overrides_keep_equals_and_colons_inside_the_value() -> None:
    got = parse_overrides(
        [
            "q=a=b=c",
            "input=s3://bucket/photos/?x=1",
            "model=ViT-B-32:laion2b_s34b_b79k",
            " key = 12 ",
            "empty=",
            "quoted='007'",
        ]
    )
    assert got == {
        "q": "a=b=c",
        "input": "s3://bucket/photos/?x=1",
        "model": "ViT-B-32:laion2b_s34b_b79k",
        "key": 12,
        "empty": None,
        "quoted": "007",
    }


@pytest.mark.parametrize("bad", ["novalue", "=3", "  =x", ""])
def test_overrides_without_a_key_are_refused(bad: str) -> None:
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides([bad])


def test_later_override_wins() -> None:
    assert parse_overrides(["n=1", "n=2"]) == {"n": 2}


# ---------------------------------------------------------------- load_config


def test_file_then_overrides_precedence(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("name: from-file\nn: 5\nratio: 0.1\n")
    got = load_config(Small, cfg, ["n=9", "flag=yes"])
    assert got == Small(name="from-file", n=9, ratio=0.1, flag=True, opt="x")
    # No file: overrides alone, defaults elsewhere.
    assert load_config(Small, None, ["name=z"]) == Small(name="z")
    # A str path works like a Path.
    assert load_config(Small, str(cfg)).n == 5


def test_override_can_null_a_field(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("name: a\nopt: set\n")
    assert load_config(Small, cfg, ["opt=null"]).opt is None


def test_unknown_key_names_the_field_and_file(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("name: a\nbatchsize: 3\n")
    with pytest.raises(ConfigError, match=r"invalid Small in .*c\.yaml: batchsize") as e:
        load_config(Small, cfg)
    assert "Extra inputs are not permitted" in str(e.value)
    with pytest.raises(ConfigError, match="typo"):
        load_config(Small, None, ["name=a", "typo=1"])


def test_bad_value_names_the_field() -> None:
    with pytest.raises(ConfigError, match=r"n: Input should be a valid integer"):
        load_config(Small, None, ["name=a", "n=lots"])
    with pytest.raises(ConfigError, match=r"name: Field required"):
        load_config(Small, None, [])


@pytest.mark.parametrize("body", ["- a\n- b\n", "just a string\n", "42\n"])
def test_non_mapping_yaml_is_refused(tmp_path: Path, body: str) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(body)
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(Small, cfg)


def test_empty_file_is_an_empty_mapping(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("# only a comment\n")
    assert load_config(Small, cfg, ["name=a"]) == Small(name="a")


def test_unreadable_or_malformed_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"cannot read config .*missing\.yaml"):
        load_config(Small, tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(Small, tmp_path)  # a directory
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match=r"cannot read config .*bad\.yaml"):
        load_config(Small, bad)


# ---------------------------------------------------------------- EmbedConfig


def test_shipped_embed_yaml_validates() -> None:
    cfg = load_config(EmbedConfig, SHIPPED)
    assert cfg.input == "keeper-demo/corpus/images"
    assert cfg.output == "keeper-demo/embeddings"
    assert cfg.model == "keeper-tiny:random"
    assert (cfg.batch_size, cfg.concurrency, cfg.rows_per_file) == (64, 1, 1024)
    assert cfg.max_failure_fraction == 0.05
    assert cfg.draft is True
    assert cfg.ray_address is None


def test_embed_overrides_win_over_the_shipped_file() -> None:
    cfg = load_config(
        EmbedConfig,
        SHIPPED,
        ["input=s3://b/photos/", "batch_size=512", "num_gpus_per_worker=0.5", "model=keeper-tiny"],
    )
    assert cfg.input == "s3://b/photos/"
    assert cfg.batch_size == 512
    assert cfg.num_gpus_per_worker == 0.5
    assert cfg.model == "keeper-tiny:random"  # canonicalised by ModelSpec


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("batch_size=-1", "batch_size"),
        ("batch_size=0", "batch_size"),
        ("max_failure_fraction=1.5", "max_failure_fraction"),
        ("max_failure_fraction=-0.1", "max_failure_fraction"),
        ("concurrency=0", "concurrency"),
        ("input=   ", "input"),
        ("num_cpus_per_worker=0", "num_cpus_per_worker"),
        ("output=null", "output"),
    ],
)
def test_embed_bad_values_name_the_field(override: str, field: str) -> None:
    with pytest.raises(ConfigError, match=rf"invalid EmbedConfig in .*embed\.yaml: {field}:"):
        load_config(EmbedConfig, SHIPPED, [override])


def test_embed_max_failure_fraction_bounds_are_inclusive() -> None:
    assert load_config(EmbedConfig, SHIPPED, ["max_failure_fraction=1"]).max_failure_fraction == 1
    assert load_config(EmbedConfig, SHIPPED, ["max_failure_fraction=0"]).max_failure_fraction == 0


def test_embed_unknown_model_arch_fails_before_any_work() -> None:
    # Whatever the class, it is a KeeperError (exit 2 in main) naming the spec and the arch.
    with pytest.raises(KeeperError, match=r"model 'NoSuchNet:random'.*unknown architecture"):
        load_config(EmbedConfig, SHIPPED, ["model=NoSuchNet:random"])
    with pytest.raises(KeeperError, match="nosuchtag"):
        load_config(EmbedConfig, SHIPPED, ["model=keeper-tiny:nosuchtag"])


def test_embed_unknown_model_arch_is_a_config_error_naming_model() -> None:
    with pytest.raises(ConfigError, match=r"invalid EmbedConfig in .*embed\.yaml: model:"):
        load_config(EmbedConfig, SHIPPED, ["model=NoSuchNet:random"])


def test_embed_unknown_key_is_refused() -> None:
    with pytest.raises(ConfigError, match="batchsize"):
        load_config(EmbedConfig, SHIPPED, ["batchsize=3"])


def test_a_jobs_console_has_keepers_progress_and_no_library_chatter() -> None:
    import logging

    from keeper_train.config import KEEPER_LOGGERS, configure_logging

    root = logging.getLogger()
    saved = root.level, {n: logging.getLogger(n).level for n in KEEPER_LOGGERS}
    try:
        root.setLevel(logging.INFO)
        configure_logging()
        # open_clip's "Parsing model identifier..." goes to the root logger at INFO.
        assert not root.isEnabledFor(logging.INFO)
        assert root.isEnabledFor(logging.WARNING)
        for name in ("keeper.embed", "keeper_train.cluster", "keeper_core.storage"):
            assert logging.getLogger(name).isEnabledFor(logging.INFO), name
        assert not logging.getLogger("open_clip.factory").isEnabledFor(logging.INFO)
    finally:
        root.setLevel(saved[0])
        for n, level in saved[1].items():
            logging.getLogger(n).setLevel(level)


def test_finding_the_pool_actors_warns_about_nothing() -> None:
    """The scan over the driver's objects used isinstance(), which reads each object's
    __class__: torch's deprecated ``distributed.reduce_op`` answered with a FutureWarning."""
    import warnings

    import torch.distributed

    from keeper_train.cluster import _pool_actors

    assert torch.distributed.is_available()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _pool_actors("MapWorker(MapBatches(NoSuchStage))") == {}
