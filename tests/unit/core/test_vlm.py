"""The VLM judge on a tiny random Llava built offline: scores are the next-token probabilities
they claim to be, batching changes nothing, and every way a checkpoint can be unusable is a load
error naming the cause. One torch thread; the model is built once per module."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pydantic
import pytest
import torch
from PIL import Image

from keeper_core.errors import ConfigError, DataError, ModelLoadError
from keeper_core.models import ACTOR_BASELINE_BYTES
from keeper_core.tiny_vlm import build_tiny_vlm
from keeper_core.vlm import (
    VlmConfig,
    VlmJudge,
    actor_memory,
    load_vlm,
    parameter_count,
    source_kind,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REL_PROMPT = 'USER: <image>\nDoes this figure show "{q}"? Please answer yes or no. ASSISTANT:'
QUALITY_PROMPT = "USER: <image>\nCan you evaluate the quality of the image? ASSISTANT: The quality of the image is"
LEVELS = ("excellent", "good", "fair", "poor", "bad")
WEIGHTS = np.array([1.0, 0.75, 0.5, 0.25, 0.0])


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_vlm(tmp_path_factory.mktemp("vlm") / "tiny")


@pytest.fixture(scope="module")
def judge(tiny_dir: Path) -> VlmJudge:
    return load_vlm(VlmConfig(source=str(tiny_dir), max_batch=3))


def _images(n: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    # Different sizes and aspect ratios: the processor resizes and crops each one.
    return [
        Image.fromarray(rng.integers(0, 256, (30 + 7 * i, 48 + 3 * i, 3), dtype=np.uint8))
        for i in range(n)
    ]


def _copy(tiny_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_dir, tmp_path / "model"))


def _next_token_probs(judge: VlmJudge, image: Image.Image, prompt: str) -> torch.Tensor:
    """Full-vocabulary softmax of the logits after ``prompt``, by plain forward, no padding."""
    inputs = judge.processor(images=[image], text=[prompt], return_tensors="pt")
    with torch.inference_mode():
        logits = judge.model(**inputs).logits[0, -1].double()
    return torch.softmax(logits, dim=-1)


# ------------------------------------------------------------------------------------ loading


def test_tiny_model_is_small_deterministic_and_says_random(tiny_dir: Path, tmp_path: Path) -> None:
    def digests(d: Path) -> dict[str, str]:
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir())}

    again = build_tiny_vlm(tmp_path / "again", seed=0)
    other = build_tiny_vlm(tmp_path / "other", seed=1)
    assert digests(again) == digests(tiny_dir)
    assert digests(other)["model.safetensors"] != digests(tiny_dir)["model.safetensors"]
    assert digests(other)["tokenizer.json"] == digests(tiny_dir)["tokenizer.json"]
    assert json.loads((tiny_dir / "keeper.json").read_text())["random_weights"] is True
    assert sum(p.stat().st_size for p in tiny_dir.iterdir()) < 2 * 1024**2
    with pytest.raises(ConfigError, match="not an empty folder"):
        build_tiny_vlm(tiny_dir)


def test_describe_names_the_model(judge: VlmJudge, tiny_dir: Path) -> None:
    d = judge.describe()
    assert d["random_weights"] is True
    assert d["architecture"] == "LlavaForConditionalGeneration"
    assert (d["device"], d["dtype"]) == ("cpu", "float32")
    assert d["parameters"] == sum(p.numel() for p in judge.model.parameters()) > 100_000
    assert d["source"] == d["local_dir"] == str(tiny_dir)
    assert d["relevance_template"] == 'Does this figure show "{query}"? Please answer yes or no.'
    assert d["level_words"] == list(LEVELS)
    assert d["level_weights"] == WEIGHTS.tolist()
    assert set(d["answer_tokens"]["yes"]) == {"yes", "Ġyes", "Yes", "ĠYes"}
    assert set(d["answer_tokens"]["poor"]) == {"Ġpoor", "ĠPoor"}  # "poor", "Poor" split


def test_two_loads_score_identically(judge: VlmJudge, tiny_dir: Path) -> None:
    other = load_vlm(VlmConfig(source=str(tiny_dir), max_batch=3))  # same chunks: same sums
    images = _images(4)
    np.testing.assert_array_equal(
        other.relevance(images, "a dog"), judge.relevance(images, "a dog")
    )
    np.testing.assert_array_equal(other.quality(images), judge.quality(images))


# ------------------------------------------------------------------------------------ scores


def test_relevance_is_p_yes_over_p_yes_plus_no(judge: VlmJudge) -> None:
    tok = judge.processor.tokenizer
    yes = sorted(tok.convert_tokens_to_ids(["yes", "Ġyes", "Yes", "ĠYes"]))
    no = sorted(tok.convert_tokens_to_ids(["no", "Ġno", "No", "ĠNo"]))
    assert list(judge.answer_token_ids["yes"]) == yes
    assert list(judge.answer_token_ids["no"]) == no
    images = _images(3, seed=1)
    queries = ["a dog on a beach", "red car", "a mountain at night under the stars"]
    got = judge.relevance(images, queries)
    for image, q, score in zip(images, queries, got, strict=True):
        prompt = REL_PROMPT.format(q=q)
        assert judge.relevance_prompt(q) == prompt
        probs = _next_token_probs(judge, image, prompt)
        p_yes, p_no = float(probs[yes].sum()), float(probs[no].sum())
        assert score == pytest.approx(p_yes / (p_yes + p_no), abs=1e-5)
    assert got.dtype == np.float32
    assert np.ptp(got) > 0.05  # random weights still separate inputs: the check can fail


def test_quality_is_weighted_softmax_over_level_tokens(judge: VlmJudge) -> None:
    assert judge.quality_prompt() == QUALITY_PROMPT
    images = _images(3, seed=2)
    got = judge.quality(images)
    for image, score in zip(images, got, strict=True):
        probs = _next_token_probs(judge, image, QUALITY_PROMPT)
        p = np.array([float(probs[list(judge.answer_token_ids[w])].sum()) for w in LEVELS])
        assert score == pytest.approx(float((p / p.sum()) @ WEIGHTS), abs=1e-5)
    assert np.ptp(got) > 0.02


def test_batched_equals_single(judge: VlmJudge) -> None:
    images = _images(7, seed=3)  # max_batch 3: chunks of 3, 3, 1
    queries = ["cat", *(f"a {'very ' * i}large house by a lake" for i in range(1, 7))]
    rel = judge.relevance(images, queries)
    qual = judge.quality(images)
    rel1 = np.array([judge.relevance([im], q)[0] for im, q in zip(images, queries, strict=True)])
    qual1 = np.array([judge.quality([im])[0] for im in images])
    np.testing.assert_allclose(rel, rel1, atol=1e-5, rtol=0)
    np.testing.assert_allclose(qual, qual1, atol=1e-5, rtol=0)
    assert np.ptp(rel) > 0.05
    assert np.ptp(qual) > 0.02


def test_scores_are_in_unit_interval_and_one_query_fits_all(judge: VlmJudge) -> None:
    images = _images(6, seed=4)
    rel = judge.relevance(images, "a dog")
    qual = judge.quality(images)
    for s in (rel, qual):
        assert s.shape == (6,)
        assert s.dtype == np.float32
        assert np.all((s >= 0) & (s <= 1))
    np.testing.assert_array_equal(rel, judge.relevance(images, ["a dog"] * 6))


def test_concurrent_calls_give_sequential_results(judge: VlmJudge) -> None:
    images = _images(4, seed=5)
    want = judge.relevance(images, "a tree")
    results: list[np.ndarray] = []

    def call() -> None:
        results.append(judge.relevance(images, "a tree"))

    threads = [threading.Thread(target=call) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert len(results) == 3
    for r in results:
        np.testing.assert_array_equal(r, want)


def test_rationale_is_bounded_greedy_generation(
    judge: VlmJudge, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[dict[str, Any]] = []
    generate = judge.model.generate

    def spy(**kwargs: Any) -> Any:
        out = generate(**kwargs)
        calls.append(
            {
                "max_new_tokens": kwargs["max_new_tokens"],
                "new": out.shape[1] - kwargs["input_ids"].shape[1],
            }
        )
        return out

    monkeypatch.setattr(judge.model, "generate", spy)
    image = _images(1, seed=6)[0]
    text = judge.rationale(image, "a dog", max_new_tokens=3)
    assert isinstance(text, str)
    assert calls[-1]["max_new_tokens"] == 3
    assert 1 <= calls[-1]["new"] <= 3
    assert judge.rationale(image, "a dog", max_new_tokens=3) == text  # greedy: deterministic
    judge.rationale(image, "a dog")
    assert calls[-1]["max_new_tokens"] == judge.config.max_rationale_tokens == 64
    for bad in (0, 65, -1):
        with pytest.raises(DataError, match=r"max_new_tokens must be an integer in 1\.\.64"):
            judge.rationale(image, "a dog", max_new_tokens=bad)


# ------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    ("images", "queries", "message"),
    [
        ([], "a dog", "no images"),
        ("ONE", "a dog", "expected a sequence of images"),
        (["not an image"], "a dog", "image 0: expected a PIL image"),
        (2, "", "query 0: empty"),
        (2, ["a dog", "   "], "query 1: empty"),
        (2, ["a dog"], "1 queries for 2 images"),
        (1, ["a", "b"], "2 queries for 1 images"),
        (1, "x" * 513, "513 characters, more than the limit of 512"),
        (1, "a dog <image> here", r"query 0: contains the special token\(s\) \['<image>'\]"),
        (2, ["a dog", "cat</s>"], r"query 1: contains the special token\(s\) \['</s>'\]"),
    ],
)
def test_bad_input_is_a_data_error(
    judge: VlmJudge, images: Any, queries: Any, message: str
) -> None:
    if isinstance(images, int):
        images = _images(images)
    elif images == "ONE":
        images = _images(1)[0]
    with pytest.raises(DataError, match=message):
        judge.relevance(images, queries)


def test_quality_needs_images(judge: VlmJudge) -> None:
    with pytest.raises(DataError, match="no images"):
        judge.quality([])


def test_parameter_count_from_the_config_alone(
    judge: VlmJudge, tiny_dir: Path, tmp_path: Path
) -> None:
    loaded = sum(p.numel() for p in judge.model.parameters())
    # only config.json is read: a folder without the weights counts the same
    bare = tmp_path / "config-only"
    bare.mkdir()
    shutil.copy(tiny_dir / "config.json", bare / "config.json")
    assert parameter_count(str(tiny_dir)) == loaded
    assert parameter_count(str(bare)) == loaded
    # fp32 on CPU, bf16 on a GPU; 25 % headroom over the baseline and the weights
    cpu = actor_memory(VlmConfig(source=str(bare)))
    gpu = actor_memory(VlmConfig(source=str(bare), device="cuda"))
    assert cpu == math.ceil(1.25 * (ACTOR_BASELINE_BYTES + 4 * loaded))
    assert gpu == math.ceil(1.25 * (ACTOR_BASELINE_BYTES + 2 * loaded))


def test_parameter_count_of_nothing_is_a_load_error(tmp_path: Path) -> None:
    source = str(tmp_path / "nope")
    with pytest.raises(ModelLoadError, match="cannot read its config") as e:
        parameter_count(source)
    assert e.value.spec == source


# ------------------------------------------------------------------------------------ load errors


def test_missing_folder_is_a_load_error(tmp_path: Path) -> None:
    source = str(tmp_path / "nope")
    with pytest.raises(ModelLoadError, match="no such directory") as e:
        load_vlm(VlmConfig(source=source))
    assert e.value.spec == source


def test_no_chat_template_is_a_load_error(tiny_dir: Path, tmp_path: Path) -> None:
    model = _copy(tiny_dir, tmp_path)
    (model / "chat_template.jinja").unlink()
    with pytest.raises(ModelLoadError, match="no chat template"):
        load_vlm(VlmConfig(source=str(model)))


def test_yes_in_pieces_is_a_load_error(tiny_dir: Path, tmp_path: Path) -> None:
    model = _copy(tiny_dir, tmp_path)
    spec = json.loads((model / "tokenizer.json").read_text())
    spellings = {"yes", "Ġyes", "Yes", "ĠYes"}
    merges = spec["model"]["merges"]
    spec["model"]["merges"] = [m for m in merges if "".join(m) not in spellings]
    assert len(spec["model"]["merges"]) == len(merges) - 4
    (model / "tokenizer.json").write_text(json.dumps(spec))

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    assert len(tok("ASSISTANT: yes", add_special_tokens=False).input_ids) > 3  # really split
    with pytest.raises(ModelLoadError, match="relevance answer word 'yes' is not a single token"):
        load_vlm(VlmConfig(source=str(model)))


def test_a_renamed_level_word_missing_from_the_vocabulary_is_a_load_error(tiny_dir: Path) -> None:
    config = VlmConfig(
        source=str(tiny_dir),
        level_words=("superb", "good", "fair", "poor", "bad"),
    )
    with pytest.raises(ModelLoadError, match="quality answer word 'superb'"):
        load_vlm(config)


def test_unreachable_hub_id_is_a_load_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads the variable once, at import; tell the imported module too.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    source = "llava-hf/llava-1.5-7b-hf"
    assert source_kind(source) == "hub"
    with pytest.raises(ModelLoadError) as e:
        load_vlm(VlmConfig(source=source), cache_dir=tmp_path)
    assert e.value.spec == source
    assert "OSError" in e.value.cause
    assert "huggingface.co" in e.value.cause


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error when no GPU is present")
def test_cuda_without_a_gpu_is_a_load_error(tiny_dir: Path) -> None:
    with pytest.raises(ModelLoadError, match="no GPU"):
        load_vlm(VlmConfig(source=str(tiny_dir), device="cuda"))


@pytest.mark.parametrize(
    ("source", "kind"),
    [
        ("s3://bucket/models/llava", "s3"),
        ("/abs/missing/dir", "local"),
        ("./rel/dir", "local"),
        ("~/models/llava", "local"),
        ("llava-hf/llava-1.5-7b-hf", "hub"),
        ("gpt2", "hub"),
    ],
)
def test_source_kind(source: str, kind: str) -> None:
    assert source_kind(source) == kind


def test_a_missing_folder_under_a_local_one_is_local_not_a_hub_id(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "checkpoints").mkdir()
    assert source_kind("checkpoints/lava") == "local"  # a typo of checkpoints/llava
    with pytest.raises(ModelLoadError) as e:
        load_vlm(VlmConfig(source="checkpoints/lava"), cache_dir=tmp_path / "cache")
    assert "huggingface.co" not in e.value.cause
    assert source_kind("llava-hf/llava-1.5-7b-hf") == "hub"  # no local folder llava-hf


def test_a_source_that_is_nothing_is_a_load_error() -> None:
    with pytest.raises(ModelLoadError, match="neither a local folder"):
        source_kind("a/b/c")


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"dtype": "bfloat16"}, "cuda only"),
        ({"relevance_template": "Is this a dog?"}, "exactly once"),
        ({"level_weights": (1.0, 0.5)}, "same length"),
        ({"level_weights": (1.0, 0.75, 0.5, 0.25, -0.1)}, r"in \[0, 1\]"),
        ({"yes_word": "Yes please"}, "one word"),
        ({"max_batch": 0}, "greater than or equal to 1"),
        ({"temperature": 1.0}, "Extra inputs are not permitted"),
    ],
)
def test_bad_config_fails_naming_the_field(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(pydantic.ValidationError, match=message):
        VlmConfig(**{"source": "/m", **changes})


def test_import_without_transformers_then_load_says_what_to_install(tiny_dir: Path) -> None:
    code = (
        "import sys; sys.modules['transformers'] = None\n"
        "import keeper_core.vlm as v\n"
        "from keeper_core.errors import ModelLoadError\n"
        "try:\n"
        f"    v.load_vlm(v.VlmConfig(source={str(tiny_dir)!r}))\n"
        "except ModelLoadError as e:\n"
        "    print('ERR', e)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert "ERR" in out.stdout
    assert "pip install 'keeper-core[vlm]'" in out.stdout
