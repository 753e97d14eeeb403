"""The non-DiT parts of the shapes model: tokenizer, text encoder, autoencoder stage.

* **Tokenizer**: a sentencepiece BPE model trained on every caption phrasing of the shapes world plus the
  system-prompt templates (so the default ``"real"`` prefix is a few whole-word pieces), with Gemma's
  special ids and byte fallback (any text encodes); saved as a transformers ``GemmaTokenizer``.
* **Text encoder**: a tiny Gemma-2 (``configs/model/shapes_gemma2.yaml``) with *random, frozen* weights
  (seeded): the DiT learns to read its features, as Lumina-Image 2.0 reads a frozen Gemma-2-2B.
* **Autoencoder stage** of the pixel recipe (``configs/train/shapes_pixel.yaml``; the shipped model trains
  its own f8 autoencoder instead, :mod:`lumina_jax.shapes.vae_train`): the pixel-space *identity* stage,
  written as exact weights of the FLUX-architecture ``AutoencoderKL``
  (``configs/model/shapes_vae_identity.yaml``: one level, so ``downsample_factor`` 1, 3 latent channels,
  12 hidden channels in 3 GroupNorm groups, no mid-block attention). The pipeline's VAE code path runs
  unchanged; encode and decode are the identity on [-1, 1] pixels to ~1e-6:

  - ``conv_in`` (centre tap) maps pixel channel ``g`` to the GroupNorm group ``[x_g, -x_g, K, -K]``
    (``K = 1000`` from the bias): the group mean is exactly 0 and its variance ``(mean(x^2) + K^2) / 2``
    is ``K^2 / 2`` to a relative 5e-7, so GroupNorm is a fixed scale;
  - every ResNet's ``conv2`` and every attention ``to_out`` are zero, so those blocks are exact identities;
  - ``norm_out`` then SiLU; ``conv_out`` takes ``silu(y) - silu(-y) = y`` (exact) times ``K / sqrt(2)``;
  - the encoder's log-variance channels are ``-30`` (deterministic latents); ``scaling_factor`` 1,
    ``shift_factor`` 0, so diffusion latents are the pixels in [-1, 1].

  The Next-DiT then works on 64x64x3 pixels with patch size 8 (64 image tokens), i.e. a pixel-space DiT.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from lumina_jax.shapes import spec

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "model"
TEXT_CONFIG = CONFIGS / "shapes_gemma2.yaml"
VAE_CONFIG = CONFIGS / "shapes_vae_identity.yaml"
K_CONST = 1000.0
TOKENIZER_VOCAB = 480
IMAGE_SIZE = 64


def text_config():
    from lumina_jax.models.gemma2 import Gemma2Config

    return Gemma2Config.from_yaml(TEXT_CONFIG)


def vae_config():
    from lumina_jax.models.vae import VAEConfig

    return VAEConfig.from_yaml(VAE_CONFIG)


# ----------------------------------------------------------------------------------------------
# tokenizer


def tokenizer_corpus() -> list[str]:
    from lumina_jax.text_templates import SYSTEM_PROMPTS

    caps = spec.vocabulary_corpus()
    prefixes = [p for p in SYSTEM_PROMPTS.values() if p]
    out = list(caps)
    for i, c in enumerate(caps):
        out.append(prefixes[i % len(prefixes)] + c)
    return out


def train_tokenizer(out_dir: str | Path, vocab_size: int = TOKENIZER_VOCAB) -> Path:
    """Sentencepiece BPE on :func:`tokenizer_corpus`, saved as a ``GemmaTokenizer`` folder."""
    import sentencepiece as spm
    from transformers import GemmaTokenizer

    out_dir = Path(out_dir)
    with tempfile.TemporaryDirectory() as td:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(tokenizer_corpus()), model_prefix=str(Path(td) / "tokenizer"), model_type="bpe",
            vocab_size=vocab_size, byte_fallback=True, pad_id=0, eos_id=1, bos_id=2, unk_id=3,
            pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>", minloglevel=2,
            num_threads=1, user_defined_symbols=["<Prompt Start>"],
        )  # fmt: skip
        (Path(td) / "tokenizer.vocab").unlink()
        tok = GemmaTokenizer.from_pretrained(td, add_bos_token=True, add_eos_token=False, padding_side="right")
        tok.save_pretrained(str(out_dir))
    return out_dir


# ----------------------------------------------------------------------------------------------
# text encoder


def _random_like(shapes: Any, rng: np.random.Generator, path: str = "") -> Any:
    if isinstance(shapes, dict):
        return {k: _random_like(v, rng, f"{path}/{k}") for k, v in sorted(shapes.items())}
    shape = tuple(shapes.shape)
    name = path.rsplit("/", 1)[-1]
    if "norm" in path or name == "scale":
        a = 0.1 * rng.standard_normal(shape)  # Gemma RMSNorm multiplies by (1 + scale)
    elif len(shape) <= 1 or name == "bias":
        a = 0.02 * rng.standard_normal(shape)
    elif "embed" in path:
        a = rng.standard_normal(shape) / np.sqrt(shape[-1])
    else:
        fan_in = shape[-2] if len(shape) == 2 else int(np.prod(shape[:-1])) // (shape[0] if len(shape) > 3 else 1)
        a = rng.standard_normal(shape) / np.sqrt(max(fan_in, 1))
    return a.astype(np.float32)


def random_text_encoder(seed: int = 0) -> tuple[Any, dict]:
    """``(config, params)`` of the frozen random Gemma-2."""
    from lumina_jax.models import gemma2 as g2

    cfg = text_config()
    return cfg, _random_like(g2.param_shapes(cfg), np.random.default_rng([seed, 2]))


# ----------------------------------------------------------------------------------------------
# identity autoencoder stage


def identity_vae_params(cfg: Any = None, k: float = K_CONST) -> tuple[Any, dict]:
    """``(config, params)`` of the FLUX-architecture AutoencoderKL that is the identity (module docstring)."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from lumina_jax.models.vae import AutoencoderKL

    cfg = cfg or vae_config()
    L, C, G = cfg.latent_channels, cfg.block_out_channels[0], cfg.norm_num_groups
    if len(cfg.block_out_channels) != 1 or len(set(cfg.block_out_channels)) != 1 or C != 4 * L or G != L:
        raise ValueError("the identity stage needs block_out_channels=[4L], norm_num_groups=L")
    if cfg.in_channels != L or cfg.out_channels != L:
        raise ValueError("the identity stage needs in_channels == out_channels == latent_channels")
    shapes = nn.unbox(jax.eval_shape(AutoencoderKL(cfg).init, jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3))))["params"]

    def zeros(tree):
        if isinstance(tree, dict):
            return {kk: zeros(v) for kk, v in tree.items()}
        return np.zeros(tree.shape, np.float32)

    p = zeros(shapes)

    def fill_norms(tree):  # every GroupNorm scale 1
        for kk, v in tree.items():
            if isinstance(v, dict):
                if "scale" in v and not isinstance(v["scale"], dict):
                    v["scale"][:] = 1.0
                else:
                    fill_norms(v)

    fill_norms(p)

    def conv_in(d: dict) -> None:  # (3, 3, L, C)
        for g in range(L):
            d["kernel"][1, 1, g, 4 * g] = 1.0
            d["kernel"][1, 1, g, 4 * g + 1] = -1.0
            d["bias"][4 * g + 2] = k
            d["bias"][4 * g + 3] = -k

    def conv_out(d: dict, n_out: int) -> None:  # (3, 3, C, n_out)
        a = k / np.sqrt(2.0)
        for g in range(L):
            d["kernel"][1, 1, 4 * g, g] = a
            d["kernel"][1, 1, 4 * g + 1, g] = -a
        if n_out == 2 * L:
            d["bias"][L:] = -30.0  # log-variance

    conv_in(p["encoder"]["conv_in"])
    conv_out(p["encoder"]["conv_out"], 2 * L)
    conv_in(p["decoder"]["conv_in"])
    conv_out(p["decoder"]["conv_out"], L)
    return cfg, p


def save_encoders(out: str | Path, seed: int = 0) -> dict[str, Path]:
    """Write ``tokenizer/``, ``text_encoder/`` (transformers layout) and ``vae/`` (diffusers layout) under
    ``out``, the inputs of ``python -m lumina_jax preprocess``. Returns the paths."""
    from lumina_jax.convert.gemma2 import save_text_encoder
    from lumina_jax.convert.vae import save_vae

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"tokenizer": out / "tokenizer", "text_encoder": out / "text_encoder", "vae": out / "vae"}
    if not paths["tokenizer"].exists():
        train_tokenizer(paths["tokenizer"])
    if not paths["text_encoder"].exists():
        gcfg, gparams = random_text_encoder(seed)
        save_text_encoder(paths["text_encoder"], gcfg, gparams)
    if not paths["vae"].exists():
        vcfg, vparams = identity_vae_params()
        save_vae(paths["vae"], vcfg, vparams)
    return paths
