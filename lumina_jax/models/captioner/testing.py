"""Tiny, offline captioner fixtures for tests and CPU benchmarks (no hub access needed).

:func:`build_tokenizer` trains a byte-level BPE with the Qwen special tokens in a few milliseconds;
:func:`save_tiny_model` writes a complete transformers model directory (random weights from transformers
itself, ``config.json``, safetensors, ``tokenizer.json``, ``preprocessor_config.json``) that both
``Qwen2VLForConditionalGeneration.from_pretrained`` / ``Qwen2_5_VLForConditionalGeneration`` and
:func:`lumina_jax.convert.captioner.load_captioner` read; :func:`hf_inputs` builds the reference model
inputs with transformers' own image processor. Needs ``torch`` + ``transformers``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from lumina_jax.models.captioner.config import QWEN2_VL, CaptionerConfig, tiny_config
from lumina_jax.models.captioner.processor import ImageProcessorConfig

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>")

_CORPUS = (
    "a photo of a red cube on a wooden table next to a small blue sphere under soft light",
    "the image shows two cats sitting on a sofa in a bright living room with large windows",
    "detailed description style main object all objects attributes spatial relations left right top bottom",
    "一只猫坐在桌子上 图片 描述 风格 主要物体 属性 空间关系",
    "You are a helpful assistant. Describe this image in detail. Give a short caption. List tags.",
)


def build_tokenizer(vocab_size: int = 320) -> Any:
    """A byte-level BPE ``tokenizers.Tokenizer`` with the Qwen special tokens at ids 0..6."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(list(_CORPUS) * 4, trainer=trainer)
    return tok


def save_tokenizer(path: str | os.PathLike, vocab_size: int = 320) -> Any:
    """Save :func:`build_tokenizer` as a ``PreTrainedTokenizerFast`` directory; returns the HF tokenizer."""
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_object=build_tokenizer(vocab_size), eos_token="<|im_end|>",
                                 pad_token="<|endoftext|>", padding_side="left")
    hf.save_pretrained(str(path))
    return hf


def tiny_model_config(family: str, tokenizer: Any, *, tie_word_embeddings: bool = False) -> CaptionerConfig:
    """:func:`lumina_jax.models.captioner.config.tiny_config` with the special ids of ``tokenizer``."""
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    vocab = -(-len(tokenizer) // 32) * 32
    return tiny_config(family, vocab_size=vocab, tie_word_embeddings=tie_word_embeddings,
                       image_token_id=ids["<|image_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                       vision_end_token_id=ids["<|vision_end|>"], video_token_id=ids["<|video_pad|>"],
                       eos_token_id=ids["<|im_end|>"])


def hf_model(config: CaptionerConfig, seed: int = 0, attn_implementation: str = "eager") -> Any:
    """A randomly initialised transformers model for ``config`` (fp32, eval mode).

    Init std is raised from 0.02 to 0.2 so that the tiny random LM has peaked, decisive logits (greedy
    decoding of near-uniform logits would compare float noise, not the implementation).
    """
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLConfig
    from transformers import Qwen2VLForConditionalGeneration

    d = config.to_hf_config()
    d.pop("architectures", None)
    d.pop("model_type", None)
    d["text_config"].pop("model_type", None)
    d["vision_config"].pop("model_type", None)
    d["text_config"]["initializer_range"] = 0.2
    d["vision_config"]["initializer_range"] = 0.2
    d["initializer_range"] = 0.2
    if config.family == QWEN2_VL:
        cfg, cls = Qwen2VLConfig(**d), Qwen2VLForConditionalGeneration
    else:
        cfg, cls = Qwen2_5_VLConfig(**d), Qwen2_5_VLForConditionalGeneration
    cfg._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    model = cls(cfg).eval()
    with torch.no_grad():  # norms init to ones / zeros; perturb them so the test sees their wiring
        for name, p in model.named_parameters():
            if "norm" in name or "ln_q" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def save_tiny_model(path: str | os.PathLike, family: str = QWEN2_VL, *, seed: int = 0,
                    tie_word_embeddings: bool = False, max_pixels: int = 64 * 64,
                    min_pixels: int = 16 * 16) -> tuple[CaptionerConfig, Any]:
    """Write a complete tiny transformers model directory; returns ``(config, torch model)``."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    hf_tok = save_tokenizer(path)
    config = tiny_model_config(family, hf_tok, tie_word_embeddings=tie_word_embeddings)
    model = hf_model(config, seed)
    model.save_pretrained(str(path))
    proc = ImageProcessorConfig.for_model(config, min_pixels=min_pixels, max_pixels=max_pixels)
    (path / "preprocessor_config.json").write_text(json.dumps(proc.to_dict(), indent=2) + "\n")
    return config, model


def random_image(rng: np.random.Generator, height: int, width: int) -> Any:
    """A smooth random RGB PIL image (gradients + noise) of the given size."""
    from PIL import Image

    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x / max(width - 1, 1), y / max(height - 1, 1), 0.5 + 0.5 * np.sin(x / 5.0 + y / 7.0)], -1)
    img = np.clip(base * 200 + rng.normal(0, 20, (height, width, 3)), 0, 255).astype(np.uint8)
    return Image.fromarray(img)


def hf_inputs(tokenizer: Any, texts: list[str], images: list[Any], proc: ImageProcessorConfig) -> dict[str, Any]:
    """Reference model inputs built with transformers' own pieces, as ``Qwen2VLProcessor.__call__`` does.

    (The processor class itself cannot be built here: in transformers 5.x it also wants a video
    processor, which needs torchvision.) Pixels and grids come from ``Qwen2VLImageProcessorPil``; each
    ``<|image_pad|>`` is expanded to ``grid_h * grid_w / merge**2`` copies before tokenization; the
    tokenizer (``padding_side="left"``) pads; ``mm_token_type_ids`` marks image tokens with 1.
    """
    import torch
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    ip = Qwen2VLImageProcessorPil(patch_size=proc.patch_size, temporal_patch_size=proc.temporal_patch_size,
                                  merge_size=proc.merge_size, min_pixels=proc.min_pixels, max_pixels=proc.max_pixels)
    vis = ip(images=images, return_tensors="pt")
    grids = vis["image_grid_thw"]
    k = 0
    expanded = []
    for t in texts:
        parts = t.split("<|image_pad|>")
        out = parts[0]
        for rest in parts[1:]:
            out += "<|image_pad|>" * int(grids[k].prod() // proc.merge_size**2) + rest
            k += 1
        expanded.append(out)
    enc = tokenizer(expanded, return_tensors="pt", padding=True)
    image_id = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    return {
        "input_ids": enc["input_ids"],
        "attention_mask": enc["attention_mask"],
        "pixel_values": vis["pixel_values"],
        "image_grid_thw": grids,
        "mm_token_type_ids": (enc["input_ids"] == image_id).to(torch.int32),
    }
