"""keeper_train.raytrain.data_config: the ingest options every Ray Train job of keeper uses."""

from __future__ import annotations

import warnings

from keeper_train.raytrain import data_config


def test_data_config_splits_train_in_order_without_rays_deprecation_warning() -> None:
    """Ray 2.60's DataConfig.default_ingest_options() sets its own deprecated exclude_resources,
    which warned on every training run (RayDeprecationWarning, on the user's screen): keeper
    asks for the same options without it. The options are still Ray's defaults, ordered."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        config = data_config()
    assert not [w for w in caught if "exclude_resources" in str(w.message)], caught
    options = config._resolve_execution_options("train")
    assert options.preserve_order is True
    assert config._datasets_to_split == ["train"]
