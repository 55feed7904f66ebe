"""A tiny random-weight Llava-style VLM, built offline, for tests and the offline demo.

``build_tiny_vlm(dest)`` writes a directory that loads exactly as a real Llava-1.5 checkpoint
does (``AutoProcessor`` / ``AutoModelForImageTextToText``): a byte-level BPE tokenizer trained on
the spot on a fixed corpus, a Llava-1.5 chat template, a 32 px CLIP vision tower and a 2-layer
Llama, about 0.6 MB in all. Nothing is downloaded. The same seed gives byte-identical files, so
every process that builds it scores identically. Its scores mean nothing (random weights), and its
``keeper.json`` says so (``"random_weights": true``) so every response made with it can say so too.

Try it::

    python -c "from keeper_core.tiny_vlm import build_tiny_vlm; print(build_tiny_vlm('/tmp/tv'))"

transformers and tokenizers are imported inside the function (``pip install 'keeper-core[vlm]'``).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from keeper_core.errors import ConfigError, ModelLoadError

#: Written beside the checkpoint; ``keeper_core.vlm`` reads ``random_weights`` from it.
KEEPER_JSON = "keeper.json"

#: Special tokens first, so their ids (0..4) never depend on the corpus.
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>", "<image>")
IMAGE_TOKEN = "<image>"

#: Llava-1.5's chat template (llava-hf): "USER: <image>\n{text} ASSISTANT:".
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' ' }}{% endfor %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

# Every answer word the judge reads appears after a space and capitalised at a line start, often
# enough that BPE merges each into one token (" yes", "Yes", " excellent" ...); build checks it.
_ANSWER_WORDS = ("yes", "no", "excellent", "good", "fair", "poor", "bad")
_CORPUS = (
    'USER: <image>\nDoes this figure show "a dog on a beach"? Please answer yes or no. '
    "ASSISTANT: Yes",
    'USER: <image>\nDoes this figure show "a red car"? Please answer yes or no. ASSISTANT: No',
    "USER: <image>\nCan you evaluate the quality of the image? ASSISTANT: The quality of the "
    "image is excellent",
    "The quality of the image is good. The quality of the image is fair.",
    "The quality of the image is poor. The quality of the image is bad.",
    "Yes, it shows a person, a cat, a tree, a house, a mountain, a street and the sky at night.",
    "No, it is a blurry photo of a city, a flower, a bird, food, water, snow and people.",
    "The answer is yes. The answer is no. It is sharp, dark, bright, noisy, well composed.",
    " ".join(f"{w} {w.capitalize()}" for w in _ANSWER_WORDS),
)
_CORPUS_REPEATS = 8  # frequency: pushes the answer words' merges ahead of rare pairs
_VOCAB_SIZE = 512

_IMAGE_SIZE = 32
_PATCH_SIZE = 8  # 4 x 4 = 16 patches, + CLS; "default" strategy drops CLS -> 16 image tokens
# Random init at 0.02 (the transformers default) makes every logit ~0, so P(yes) ~ 0.5 for any
# input and a test could not tell a wrong score from a right one; 0.2 spreads the scores.
_INIT_STD = 0.2


def build_tiny_vlm(dest: str | Path, *, seed: int = 0) -> Path:
    """Write a tiny random-weight Llava-style VLM to ``dest`` (offline, deterministic).

    The directory holds what ``save_pretrained`` writes for a model and its processor (config,
    safetensors weights, tokenizer, image processor, chat template) plus ``keeper.json`` with
    ``{"random_weights": true, ...}``. It is built in a temporary sibling folder and renamed into
    place, so a crash never leaves a half-written model behind.

    Args:
        dest: a folder that does not exist yet or is empty.
        seed: seeds the weights; the same seed gives byte-identical files.

    Returns:
        ``dest`` as a Path.

    Raises:
        ConfigError: ``dest`` exists and is not an empty folder.
        ModelLoadError: transformers/tokenizers are not installed, or the trained tokenizer does
            not encode an answer word as one token (a bug in the corpus, never silent).
    """
    out = Path(dest)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"build_tiny_vlm: {out} exists and is not an empty folder")
    try:
        import torch
        from transformers import (
            CLIPVisionConfig,
            LlamaConfig,
            LlavaConfig,
            LlavaForConditionalGeneration,
            LlavaProcessor,
        )
        from transformers.models.llava.image_processing_llava import LlavaImageProcessor
    except ImportError as e:
        raise ModelLoadError(
            "keeper-tiny-vlm", f"{e}; install the VLM extra: pip install 'keeper-core[vlm]'"
        ) from e

    tokenizer = _train_tokenizer()
    processor = LlavaProcessor(
        image_processor=LlavaImageProcessor(
            size={"shortest_edge": _IMAGE_SIZE},
            crop_size={"height": _IMAGE_SIZE, "width": _IMAGE_SIZE},
        ),
        tokenizer=tokenizer,
        patch_size=_PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS token
        chat_template=CHAT_TEMPLATE,
    )
    special = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=_IMAGE_SIZE,
            patch_size=_PATCH_SIZE,
            projection_dim=32,
            initializer_range=_INIT_STD,
        ),
        text_config=LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=512,
            initializer_range=_INIT_STD,
            bos_token_id=special["<s>"],
            eos_token_id=special["</s>"],
            pad_token_id=special["<pad>"],
        ),
        image_token_index=special[IMAGE_TOKEN],
        image_seq_length=(_IMAGE_SIZE // _PATCH_SIZE) ** 2,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
    )
    # fork_rng: seeding must not disturb the caller's global RNG stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(config).eval()
    model.generation_config.pad_token_id = special["<pad>"]

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        meta = {
            "random_weights": True,
            "builder": "keeper_core.tiny_vlm.build_tiny_vlm",
            "seed": seed,
            "note": "random weights: every score from this model is meaningless",
        }
        (tmp / KEEPER_JSON).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n", "utf-8")
        if out.exists():
            out.rmdir()  # empty (checked above); os.replace needs the name free or empty
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _train_tokenizer() -> Any:
    """A byte-level BPE tokenizer (GPT-2 style, BOS prepended like Llama's) on the fixed corpus."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=_VOCAB_SIZE,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(_CORPUS) * _CORPUS_REPEATS, trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    for word in _ANSWER_WORDS:
        for variant in (f" {word}", f" {word.capitalize()}"):
            pieces = tok.encode(variant, add_special_tokens=False).tokens
            if len(pieces) != 1:
                raise ModelLoadError("keeper-tiny-vlm", f"{variant!r} encodes as {pieces}")
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": IMAGE_TOKEN},
        padding_side="left",
    )
