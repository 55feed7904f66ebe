"""The MLflow pyfunc wrapper of a keeper series ranker, logged as "models from code".

MLflow stores this file with the model instead of pickling an object, and the ranker itself is
plain artifacts (``ranker.json`` + ``weights.safetensors``): loading a registered version runs no
pickle and needs only keeper_core. Input: one row per image with ``series_id``, ``image_uri``,
``embedding`` and the quality feature columns the ranker uses (the embedding table's columns).
Output: ``series_id, image_uri, score, prob, rank`` (rank 1 = the keeper of its series).
A fine-tuned ranker (``keeper_core.finetune.TunedRanker``, its own vision tower) takes the same
rows but reads and embeds each ``image_uri`` itself; its ``embedding`` column is not used.

    model = mlflow.pyfunc.load_model("models:/keeper-ranker@champion")
    ranked = model.predict(rows_of_the_embedding_table)
"""

from __future__ import annotations

from typing import Any

import pandas as pd
from mlflow.models import set_model
from mlflow.pyfunc.model import PythonModel

from keeper_core.ranker import ARTIFACT_KEY, load_ranker

__all__ = ["ARTIFACT_KEY", "KeeperRankerModel"]


class KeeperRankerModel(PythonModel):
    def load_context(self, context: Any) -> None:
        self.ranker = load_ranker(context.artifacts[ARTIFACT_KEY])

    def predict(self, context: Any, model_input: pd.DataFrame, params: Any = None) -> pd.DataFrame:
        return self.ranker.rank(model_input)


set_model(KeeperRankerModel())
