"""Architecture of the Qwen2-VL / Qwen2.5-VL captioners, and translation to and from transformers configs.

UniCap (spec §8) is a fine-tuned Qwen2-VL-7B; its weights are not released, so the captioner accepts any
checkpoint of the two public families:

- ``qwen2_vl``: ViT with LayerNorm + quick-GELU MLP blocks, all attention full (per image);
- ``qwen2_5_vl``: ViT with RMSNorm + SwiGLU (biased) blocks, window attention except on
  ``fullatt_block_indexes``, an RMSNorm patch merger and a separate ``out_hidden_size``.

Both use the same Qwen2 language model (GQA with q/k/v biases, SwiGLU MLP, RMSNorm, multimodal rotary
positions "M-RoPE"). Field names are ours; :meth:`CaptionerConfig.from_hf_config` reads both the flat
config.json of the released checkpoints (transformers 4.4x: text fields at the top level, ``rope_scaling``
with ``mrope_section``) and the nested 5.x layout (``text_config`` / ``rope_parameters``);
:meth:`CaptionerConfig.to_hf_config` writes the nested 5.x layout.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

QWEN2_VL = "qwen2_vl"
QWEN2_5_VL = "qwen2_5_vl"
FAMILIES = (QWEN2_VL, QWEN2_5_VL)

_VISION_ACTS = ("quick_gelu", "silu", "gelu", "gelu_pytorch_tanh")


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """The vision tower: patch embedding, ``depth`` ViT blocks, 2x2 patch merger into the LM width."""

    family: str = QWEN2_VL
    depth: int = 32
    embed_dim: int = 1280  # block width (HF: ``embed_dim`` for Qwen2-VL, ``hidden_size`` for Qwen2.5-VL)
    num_heads: int = 16
    mlp_dim: int = 5120  # Qwen2-VL: embed_dim * mlp_ratio; Qwen2.5-VL: intermediate_size
    out_dim: int = 3584  # merger output = LM hidden size
    hidden_act: str = "quick_gelu"
    in_channels: int = 3
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    rope_theta: float = 10000.0
    window_size: int = 0  # pixels; 0 = no window attention (Qwen2-VL)
    fullatt_block_indexes: tuple[int, ...] = ()
    tokens_per_second: int = 4  # videos only; carried through to the exported config

    def __post_init__(self) -> None:
        object.__setattr__(self, "fullatt_block_indexes", tuple(int(i) for i in self.fullatt_block_indexes))
        object.__setattr__(self, "rope_theta", float(self.rope_theta))
        if self.family not in FAMILIES:
            raise ValueError(f"unknown captioner family {self.family!r}; expected one of {FAMILIES}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"vision embed_dim={self.embed_dim} is not a multiple of num_heads={self.num_heads}")
        if self.head_dim % 4:
            raise ValueError(f"vision head_dim={self.head_dim} must be a multiple of 4 for the 2D rotary embedding")
        if self.hidden_act not in _VISION_ACTS:
            raise ValueError(f"vision hidden_act={self.hidden_act!r}; supported: {_VISION_ACTS}")
        if self.window_size:
            unit = self.patch_size * self.spatial_merge_size
            if self.window_size % unit:
                raise ValueError(f"window_size={self.window_size} must be a multiple of patch*merge={unit}")
        bad = [i for i in self.fullatt_block_indexes if not 0 <= i < self.depth]
        if bad:
            raise ValueError(f"fullatt_block_indexes {bad} out of range for depth={self.depth}")

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Length of one flattened patch ``(C, T, P, P)``."""
        return self.in_channels * self.temporal_patch_size * self.patch_size**2

    @property
    def merge_unit(self) -> int:
        """Patches per LM token (``spatial_merge_size ** 2``)."""
        return self.spatial_merge_size**2

    @property
    def window_merged(self) -> int:
        """Side of an attention window in merged tokens (0 when the tower has no window attention)."""
        return self.window_size // (self.patch_size * self.spatial_merge_size) if self.window_size else 0

    @property
    def window_slots(self) -> int:
        """Patch slots per window in the padded layout (``merge_unit`` without windows)."""
        w = self.window_merged
        return (w * w if w else 1) * self.merge_unit

    def layer_is_full(self) -> tuple[bool, ...]:
        """Per block: True for full (per-image) attention, False for window attention."""
        if not self.window_size:
            return (True,) * self.depth
        return tuple(i in self.fullatt_block_indexes for i in range(self.depth))


@dataclasses.dataclass(frozen=True)
class TextConfig:
    """The Qwen2 decoder (HF ``Qwen2VLTextModel``) plus LM head."""

    vocab_size: int = 152064
    hidden_size: int = 3584
    intermediate_size: int = 18944
    num_layers: int = 28
    num_heads: int = 28
    num_kv_heads: int = 4
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1000000.0
    mrope_section: tuple[int, int, int] = (16, 24, 24)
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"

    def __post_init__(self) -> None:
        object.__setattr__(self, "mrope_section", tuple(int(s) for s in self.mrope_section))
        object.__setattr__(self, "rope_theta", float(self.rope_theta))
        object.__setattr__(self, "rms_norm_eps", float(self.rms_norm_eps))
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size={self.hidden_size} is not a multiple of num_heads={self.num_heads}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        if len(self.mrope_section) != 3 or sum(self.mrope_section) != self.head_dim // 2:
            raise ValueError(f"mrope_section={self.mrope_section} must have 3 entries summing to head_dim/2="
                             f"{self.head_dim // 2}")
        if self.hidden_act != "silu":
            raise ValueError(f"text hidden_act={self.hidden_act!r}; only 'silu' is supported")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclasses.dataclass(frozen=True)
class CaptionerConfig:
    """A whole Qwen2(.5)-VL model: vision tower, language model and the special token ids."""

    vision: VisionConfig = dataclasses.field(default_factory=VisionConfig)
    text: TextConfig = dataclasses.field(default_factory=TextConfig)
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    bos_token_id: Optional[int] = 151643
    eos_token_id: tuple[int, ...] = (151645,)
    pad_token_id: Optional[int] = None

    def __post_init__(self) -> None:
        eos = self.eos_token_id
        eos = () if eos is None else (eos,) if isinstance(eos, int) else tuple(int(e) for e in eos)
        object.__setattr__(self, "eos_token_id", eos)
        if self.vision.out_dim != self.text.hidden_size:
            raise ValueError(f"vision out_dim={self.vision.out_dim} must equal the text hidden_size="
                             f"{self.text.hidden_size} (the merger feeds the language model)")
        for name in ("image_token_id", "vision_start_token_id", "vision_end_token_id"):
            tid = getattr(self, name)
            if not 0 <= tid < self.text.vocab_size:
                raise ValueError(f"{name}={tid} is outside the vocabulary (size {self.text.vocab_size})")

    @property
    def family(self) -> str:
        return self.vision.family

    # -- transformers config.json -------------------------------------------------------------

    @classmethod
    def from_hf_config(cls, hf: Mapping[str, Any]) -> "CaptionerConfig":
        """From a transformers ``config.json`` dict of a ``qwen2_vl`` or ``qwen2_5_vl`` model.

        Raises ``ValueError`` naming the setting for anything this port does not implement (another model
        type, sliding-window attention in the LM, non-default RoPE scaling).
        """
        family = hf.get("model_type")
        if family not in FAMILIES:
            raise ValueError(f"expected a Qwen2-VL or Qwen2.5-VL config (model_type in {FAMILIES}), "
                             f"got model_type={family!r}")
        text = dict(hf.get("text_config") or {})
        # Flat (released-checkpoint) layout: text fields live at the top level.
        for k, v in hf.items():
            if k not in ("text_config", "vision_config") and k not in text:
                text[k] = v
        vis = dict(hf.get("vision_config") or {})

        if text.get("use_sliding_window", False):
            raise ValueError("use_sliding_window=True is not supported (no released Qwen2-VL checkpoint uses it)")
        rope = dict(text.get("rope_parameters") or text.get("rope_scaling") or {})
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "mrope"):
            raise ValueError(f"only default M-RoPE is supported, got rope_type={rope_type!r}")
        rope_theta = rope.get("rope_theta", text.get("rope_theta", 1000000.0))
        mrope = tuple(rope.get("mrope_section", (16, 24, 24)))

        heads = int(text["num_attention_heads"])
        tconf = TextConfig(
            vocab_size=int(text["vocab_size"]),
            hidden_size=int(text["hidden_size"]),
            intermediate_size=int(text["intermediate_size"]),
            num_layers=int(text["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(text.get("num_key_value_heads") or heads),
            rms_norm_eps=float(text.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope_theta),
            mrope_section=mrope,
            max_position_embeddings=int(text.get("max_position_embeddings", 32768)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", text.get("tie_word_embeddings", False))),
            hidden_act=text.get("hidden_act", "silu"),
        )

        vrope = vis.get("rope_parameters") or {}
        common = dict(
            family=family,
            depth=int(vis.get("depth", 32)),
            num_heads=int(vis.get("num_heads", 16)),
            in_channels=int(vis.get("in_channels", vis.get("in_chans", 3))),
            patch_size=int(vis.get("patch_size", vis.get("spatial_patch_size", 14))),
            temporal_patch_size=int(vis.get("temporal_patch_size", 2)),
            spatial_merge_size=int(vis.get("spatial_merge_size", 2)),
            rope_theta=float(vrope.get("rope_theta", 10000.0)),
        )
        if family == QWEN2_VL:
            embed = int(vis.get("embed_dim", 1280))
            vconf = VisionConfig(
                embed_dim=embed,
                mlp_dim=int(embed * vis.get("mlp_ratio", 4)),
                out_dim=int(vis.get("hidden_size", tconf.hidden_size)),
                hidden_act=vis.get("hidden_act", "quick_gelu"),
                **common,
            )
        else:
            vconf = VisionConfig(
                embed_dim=int(vis.get("hidden_size", 1280)),
                mlp_dim=int(vis.get("intermediate_size", 3420)),
                out_dim=int(vis.get("out_hidden_size", tconf.hidden_size)),
                hidden_act=vis.get("hidden_act", "silu"),
                window_size=int(vis.get("window_size", 112)),
                fullatt_block_indexes=tuple(vis.get("fullatt_block_indexes", (7, 15, 23, 31))),
                tokens_per_second=int(vis.get("tokens_per_second", 4)),
                **common,
            )

        def tok(name: str, default: Optional[int]) -> Optional[int]:
            v = hf.get(name, text.get(name, default))
            if isinstance(v, (list, tuple)):
                v = v[0] if v else None
            return None if v is None else int(v)

        eos = hf.get("eos_token_id", text.get("eos_token_id", 151645))
        return cls(
            vision=vconf,
            text=tconf,
            image_token_id=int(hf.get("image_token_id", 151655)),
            video_token_id=int(hf.get("video_token_id", 151656)),
            vision_start_token_id=int(hf.get("vision_start_token_id", 151652)),
            vision_end_token_id=int(hf.get("vision_end_token_id", 151653)),
            bos_token_id=tok("bos_token_id", 151643),
            eos_token_id=eos,
            pad_token_id=tok("pad_token_id", None),
        )

    def to_hf_config(self, dtype: str = "float32") -> dict[str, Any]:
        """A nested ``config.json`` dict that ``*ForConditionalGeneration`` of transformers 5 and 4.5x loads."""
        t, v = self.text, self.vision
        eos: Any = list(self.eos_token_id) if len(self.eos_token_id) != 1 else self.eos_token_id[0]
        text = {
            "model_type": f"{self.family}_text",
            "vocab_size": t.vocab_size,
            "hidden_size": t.hidden_size,
            "intermediate_size": t.intermediate_size,
            "num_hidden_layers": t.num_layers,
            "num_attention_heads": t.num_heads,
            "num_key_value_heads": t.num_kv_heads,
            "hidden_act": t.hidden_act,
            "max_position_embeddings": t.max_position_embeddings,
            "rms_norm_eps": t.rms_norm_eps,
            "use_sliding_window": False,
            "rope_parameters": {"rope_type": "default", "rope_theta": t.rope_theta,
                                "mrope_section": list(t.mrope_section)},
            # transformers 4.x reads these instead (without them its M-RoPE finds no mrope_section)
            "rope_theta": t.rope_theta,
            "rope_scaling": {"type": "mrope", "mrope_section": list(t.mrope_section)},
            "bos_token_id": self.bos_token_id,
            "eos_token_id": eos,
            "pad_token_id": self.pad_token_id,
            "dtype": dtype,
        }
        vision: dict[str, Any] = {
            "model_type": f"{self.family}_vision",
            "depth": v.depth,
            "num_heads": v.num_heads,
            "in_channels": v.in_channels,
            "patch_size": v.patch_size,
            "temporal_patch_size": v.temporal_patch_size,
            "spatial_merge_size": v.spatial_merge_size,
            "hidden_act": v.hidden_act,
            "rope_parameters": {"rope_type": "axial", "rope_theta": v.rope_theta},
        }
        if self.family == QWEN2_VL:
            if v.mlp_dim % v.embed_dim:
                raise ValueError(f"Qwen2-VL needs mlp_dim a multiple of embed_dim, got {v.mlp_dim}/{v.embed_dim}")
            vision.update(embed_dim=v.embed_dim, mlp_ratio=v.mlp_dim // v.embed_dim, hidden_size=v.out_dim)
        else:
            vision.update(hidden_size=v.embed_dim, intermediate_size=v.mlp_dim, out_hidden_size=v.out_dim,
                          window_size=v.window_size, fullatt_block_indexes=list(v.fullatt_block_indexes),
                          tokens_per_second=v.tokens_per_second)
        arch = "Qwen2VLForConditionalGeneration" if self.family == QWEN2_VL else "Qwen2_5_VLForConditionalGeneration"
        return {
            "architectures": [arch],
            "model_type": self.family,
            "text_config": text,
            "vision_config": vision,
            "image_token_id": self.image_token_id,
            "video_token_id": self.video_token_id,
            "vision_start_token_id": self.vision_start_token_id,
            "vision_end_token_id": self.vision_end_token_id,
            "tie_word_embeddings": t.tie_word_embeddings,
            "dtype": dtype,
        }


def qwen2_vl_7b() -> CaptionerConfig:
    """Qwen/Qwen2-VL-7B-Instruct (the UniCap base model, spec §8)."""
    return CaptionerConfig(
        vision=VisionConfig(family=QWEN2_VL, depth=32, embed_dim=1280, num_heads=16, mlp_dim=5120, out_dim=3584,
                            hidden_act="quick_gelu"),
        text=TextConfig(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_layers=28, num_heads=28,
                        num_kv_heads=4, rms_norm_eps=1e-6, rope_theta=1000000.0, mrope_section=(16, 24, 24)),
    )


def qwen2_5_vl_7b() -> CaptionerConfig:
    """Qwen/Qwen2.5-VL-7B-Instruct."""
    return CaptionerConfig(
        vision=VisionConfig(family=QWEN2_5_VL, depth=32, embed_dim=1280, num_heads=16, mlp_dim=3420, out_dim=3584,
                            hidden_act="silu", window_size=112, fullatt_block_indexes=(7, 15, 23, 31)),
        text=TextConfig(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_layers=28, num_heads=28,
                        num_kv_heads=4, rms_norm_eps=1e-6, rope_theta=1000000.0, mrope_section=(16, 24, 24)),
    )


def tiny_config(family: str = QWEN2_VL, *, vocab_size: int = 160, tie_word_embeddings: bool = False,
                image_token_id: int = 151, vision_start_token_id: int = 150, vision_end_token_id: int = 152,
                video_token_id: int = 153, eos_token_id: int = 155) -> CaptionerConfig:
    """A few-kilobyte random-weights config for tests and CPU benchmarks (both families).

    Heads, GQA, window attention (2.5) and a non-trivial ``mrope_section`` are all exercised.
    """
    if family == QWEN2_VL:
        vision = VisionConfig(family=QWEN2_VL, depth=2, embed_dim=32, num_heads=2, mlp_dim=64, out_dim=64,
                              hidden_act="quick_gelu", patch_size=4)
    else:
        vision = VisionConfig(family=QWEN2_5_VL, depth=3, embed_dim=32, num_heads=2, mlp_dim=48, out_dim=64,
                              hidden_act="silu", patch_size=4, window_size=16, fullatt_block_indexes=(1,))
    text = TextConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                      num_kv_heads=2, rms_norm_eps=1e-6, rope_theta=10000.0, mrope_section=(4, 2, 2),
                      max_position_embeddings=1024, tie_word_embeddings=tie_word_embeddings)
    return CaptionerConfig(vision=vision, text=text, image_token_id=image_token_id,
                           video_token_id=video_token_id, vision_start_token_id=vision_start_token_id,
                           vision_end_token_id=vision_end_token_id, bos_token_id=None,
                           eos_token_id=(eos_token_id,), pad_token_id=None)
