"""A tiny, randomly initialised Lumina-Image 2.0 (all components) for CPU smoke runs and tests.

It is what ``Lumina2Pipeline.from_pretrained()`` falls back to while no trained default model is bundled
(``lumina_jax/assets/default_model/``): same code path as the 2B model, images are noise-like. The
tokenizer is a small sentencepiece BPE model trained here on a fixed corpus (the Gemma tokenizer cannot
be downloaded offline), with Gemma's special ids and byte fallback so any text encodes.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any, Optional

import numpy as np

from lumina_jax.models.gemma2 import Gemma2Config
from lumina_jax.models.nextdit import NextDiTConfig
from lumina_jax.models.vae import VAEConfig
from lumina_jax.text_templates import SYSTEM_PROMPTS

log = logging.getLogger(__name__)

_CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "model"

TINY_TRANSFORMER = NextDiTConfig(
    patch_size=2, in_channels=16, dim=64, n_layers=2, n_refiner_layers=1, n_heads=4, n_kv_heads=2,
    multiple_of=16, qk_norm=True, qk_norm_eps=1e-5, cap_feat_dim=64, axes_dims=(8, 4, 4),
)  # fmt: skip
"""Next-DiT with the code path of the 2B model; ``cap_feat_dim`` = the tiny Gemma's width."""

TINY_IMAGE_SIZE = 64

_CORPUS = [
    "a photo of a cat", "a red car parked on a quiet street", "the quick brown fox jumps over the lazy dog",
    "an oil painting of a mountain lake at dawn", "a portrait of an astronaut in a garden",
    "a bowl of fruit on a wooden table", "a watercolor sketch of a lighthouse in a storm",
    "a cozy living room with a fireplace", "a futuristic city skyline at night with neon lights",
]  # fmt: skip


def tiny_text_config() -> Gemma2Config:
    return Gemma2Config.from_yaml(_CONFIGS / "gemma2_tiny.yaml")


def tiny_vae_config() -> VAEConfig:
    return VAEConfig.from_yaml(_CONFIGS / "vae_tiny.yaml")


def train_tokenizer(out_dir: str | Path, *, vocab_size: int = 400) -> Path:
    """Train a small sentencepiece BPE model with Gemma's special ids and save it as a transformers
    ``GemmaTokenizer`` folder (``save_pretrained``) in ``out_dir``. Returns ``out_dir``."""
    import sentencepiece as spm
    from transformers import GemmaTokenizer

    out_dir = Path(out_dir)
    corpus = [s for p in _CORPUS for s in (p, SYSTEM_PROMPTS["real"] + p, SYSTEM_PROMPTS["base"] + p)] * 20
    with tempfile.TemporaryDirectory() as td:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(corpus), model_prefix=str(Path(td) / "tokenizer"), model_type="bpe",
            vocab_size=vocab_size, byte_fallback=True, pad_id=0, eos_id=1, bos_id=2, unk_id=3,
            pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>", minloglevel=2,
            num_threads=1,
        )  # fmt: skip
        (Path(td) / "tokenizer.vocab").unlink()
        tok = GemmaTokenizer.from_pretrained(td, add_bos_token=True, add_eos_token=False, padding_side="right")
        tok.save_pretrained(str(out_dir))
    return out_dir


def _random_like(shapes: Any, rng: np.random.Generator, path: str = "") -> Any:
    """NumPy random values for a tree of shapes (no jit compile, unlike running ``init``).

    Norm scales ~1, biases and other vectors small, kernels ~ N(0, 1/fan_in). Unlike the models' own
    initialisers nothing is zero (adaLN and the final layer start at zero there), so the untrained
    Next-DiT produces a prompt-dependent, non-zero velocity.
    """
    if isinstance(shapes, dict):
        return {k: _random_like(v, rng, f"{path}/{k}") for k, v in shapes.items()}
    shape = tuple(shapes.shape)
    name = path.rsplit("/", 1)[-1]
    # big tensors (the 2B shapes' matrices) are drawn in float32: twice as fast, half the host memory
    dt = np.float32 if int(np.prod(shape, dtype=np.int64)) >= 2**20 else np.float64
    if name == "scale" or (len(shape) == 1 and "norm" in path and not name == "bias"):
        a = 1.0 + 0.1 * rng.standard_normal(shape)
    elif len(shape) <= 1 or (name == "bias"):
        a = 0.02 * rng.standard_normal(shape)
    else:
        fan_in = int(np.prod(shape[-4:-1])) if len(shape) == 4 else shape[-2]
        a = rng.standard_normal(shape, dtype=dt)
        a /= dt(np.sqrt(max(fan_in, 1)))
    return a.astype(np.float32, copy=False)


def random_components(seed: int = 0, *, transformer_config: NextDiTConfig = TINY_TRANSFORMER,
                      text_config: Optional[Gemma2Config] = None, vae_config: Optional[VAEConfig] = None,
                      tokenizer: Any = None):
    """:class:`~lumina_jax.convert.components.Components` with random weights (tiny configs by default)."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from lumina_jax.convert.components import DEFAULT_SCHEDULER, Components
    from lumina_jax.models import gemma2 as g2
    from lumina_jax.models.nextdit import abstract_params
    from lumina_jax.models.vae import AutoencoderKL
    from lumina_jax.text import load_tokenizer

    text_config = text_config or tiny_text_config()
    vae_config = vae_config or tiny_vae_config()
    rng = np.random.default_rng(seed)
    key = jax.random.PRNGKey(seed)
    unbox = lambda t: jax.tree_util.tree_map(lambda x: x, nn.meta.unbox(t))  # noqa: E731
    dit = _random_like(unbox(abstract_params(transformer_config)), rng)
    gemma = _random_like(g2.param_shapes(text_config), rng)
    f = vae_config.downsample_factor
    vae_shapes = jax.eval_shape(AutoencoderKL(vae_config).init, key, jnp.zeros((1, 2 * f, 2 * f, 3)))["params"]
    vae = _random_like(unbox(vae_shapes), rng)
    if tokenizer is None:
        with tempfile.TemporaryDirectory() as td:
            tokenizer = load_tokenizer(train_tokenizer(Path(td) / "tokenizer"))
    size = TINY_IMAGE_SIZE if transformer_config == TINY_TRANSFORMER else 1024
    comps = Components(transformer_config, dit, text_config, gemma, tokenizer, vae_config, vae,
                       dict(DEFAULT_SCHEDULER), size, f"random(seed={seed})", "random")
    comps.check()
    return comps
