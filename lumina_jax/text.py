"""Prompt -> tokens -> caption features: the text side of Lumina-Image 2.0 (spec §4).

- :func:`load_tokenizer` loads the Gemma tokenizer with transformers from a local directory (a saved
  ``tokenizer.json``/``tokenizer_config.json`` folder, or a bare sentencepiece ``tokenizer.model``), or
  from a hub id when the machine has network. Padding is forced to the right (Lumina pads right; the
  transformers default for Gemma is left), and the tokenizer must prepend ``<bos>`` and append nothing,
  like google/gemma-2-2b's: the unconditional prompt ``""`` then encodes to ``[<bos>]``.
- :class:`TextEncoder` prepends the system prompt (:func:`lumina_jax.text_templates.build_prompt`;
  ``""`` stays ``""`` with no system prompt), tokenizes, truncates to ``max_length`` (256 by default,
  as in ORIG and diffusers) with a warning -- or an error -- that says how many tokens each prompt lost,
  pads to a *length bucket* (64, 128, 256, ... up to ``max_length``) and runs a jit-compiled
  Gemma-2 forward compiled once per ``(batch, bucket)``. It returns ``hidden_states[-2]``
  (:func:`lumina_jax.models.gemma2.dit_features`) and the boolean token mask.

Why buckets are exact: with right padding and causal attention, no valid token ever attends to a pad
token, so the features of valid tokens do not depend on how much padding follows (up to float summation
order); Next-DiT drops padded caption tokens (spec §2.6). ORIG pads to the batch's longest prompt
(multiple of 8) and diffusers always to 256; both give the same images. Features at padded positions
are set to zero here so nothing unmasked can leak into downstream code.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import warnings
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lumina_jax.models.gemma2 import Gemma2Config, dit_features
from lumina_jax.text_templates import DEFAULT_SYSTEM_PROMPT, build_prompt

log = logging.getLogger(__name__)

Params = dict[str, Any]
DEFAULT_MAX_LENGTH = 256
MIN_BUCKET = 64
_SURROGATE = re.compile("[\ud800-\udfff]")  # not encodable as UTF-8: the tokenizer cannot take it
_DTYPES = {"fp32": jnp.float32, "float32": jnp.float32, "bf16": jnp.bfloat16, "bfloat16": jnp.bfloat16}


def _user_stacklevel() -> int:
    """``warnings.warn`` stacklevel (for the caller of this function) of the first frame outside
    ``lumina_jax``, so a warning points at the user's line however deep inside the package it is raised."""
    pkg = str(Path(__file__).resolve().parent)
    frame, level = sys._getframe(1), 1
    while frame is not None and str(Path(frame.f_code.co_filename).resolve()).startswith(pkg):
        frame, level = frame.f_back, level + 1
    return level


class PromptTooLongError(ValueError):
    """A prompt (with its system prompt) has more tokens than ``max_length`` and ``on_truncate="error"``."""


# ----------------------------------------------------------------------------------------------
# tokenizer


def default_tokenizer_path(text_encoder_path: str | os.PathLike) -> Path:
    """Where the tokenizer of a text encoder is when not given: ``tokenizer/`` inside a pipeline folder
    passed as the text encoder, a sibling ``tokenizer/`` (Lumina-Image-2.0 / diffusers layout), else the
    text encoder's own folder."""
    p = Path(text_encoder_path)
    for candidate in (p / "tokenizer", p.parent / "tokenizer"):
        if candidate.is_dir():
            return candidate
    return p


def load_tokenizer(path_or_hub_id: str | os.PathLike, *, subfolder: Optional[str] = None) -> Any:
    """Load the Gemma tokenizer for Lumina: right padding, ``<bos>`` prepended, no ``<eos>`` appended.

    ``path_or_hub_id``: a local directory holding ``tokenizer.json`` / ``tokenizer_config.json`` (what
    ``save_pretrained`` writes; the Lumina-Image-2.0 repo's ``tokenizer/`` folder) or only a sentencepiece
    ``tokenizer.model``; otherwise a hub id such as ``"google/gemma-2-2b"`` (needs network or the HF
    cache). ``subfolder`` selects e.g. ``"tokenizer"`` inside a pipeline directory or repo.
    """
    from transformers import AutoTokenizer, GemmaTokenizer

    local = Path(path_or_hub_id) / subfolder if subfolder else Path(path_or_hub_id)
    if local.is_dir():
        names = {p.name for p in local.iterdir()}
        if {"tokenizer.json", "tokenizer_config.json"} & names:
            tok = AutoTokenizer.from_pretrained(str(local), padding_side="right", local_files_only=True)
        elif "tokenizer.model" in names:
            # A bare sentencepiece model: AutoTokenizer cannot tell its class. (Never use
            # GemmaTokenizer(vocab_file=...): it silently builds an empty 5-token vocabulary.)
            tok = GemmaTokenizer.from_pretrained(str(local), add_bos_token=True, add_eos_token=False,
                                                 padding_side="right", local_files_only=True)
        else:
            raise FileNotFoundError(
                f"{local}: no tokenizer.json, tokenizer_config.json or tokenizer.model in this directory "
                f"(found: {sorted(names)[:20]})"
            )
    elif local.exists():
        raise NotADirectoryError(f"{local}: expected a tokenizer directory, not a file")
    else:
        try:
            tok = AutoTokenizer.from_pretrained(str(path_or_hub_id), subfolder=subfolder or "",
                                                padding_side="right")
        except OSError as e:
            raise OSError(
                f"{str(path_or_hub_id)!r} is not a local directory and could not be loaded from the "
                f"Hugging Face hub (no network or not cached?): {e}"
            ) from None
    tok.padding_side = "right"
    _check_tokenizer(tok, str(local))
    return tok


def _check_tokenizer(tok: Any, where: str) -> None:
    if tok.pad_token_id is None:
        raise ValueError(f"{where}: tokenizer has no pad token (Gemma's is <pad> = 0)")
    ids = list(tok("", add_special_tokens=True)["input_ids"])
    if tok.bos_token_id is None or ids != [tok.bos_token_id]:
        raise ValueError(
            f"{where}: tokenizer encodes the empty prompt as {ids}; Lumina needs exactly [<bos>] "
            f"(bos_token_id={tok.bos_token_id}): set \"add_bos_token\": true and \"add_eos_token\": false in its "
            f"tokenizer_config.json (as Gemma's own tokenizer folder has them)"
        )


# ----------------------------------------------------------------------------------------------
# buckets


def bucket_lengths(max_length: int, min_bucket: int = MIN_BUCKET) -> tuple[int, ...]:
    """``(64, 128, 256, ...)`` below ``max_length``, then ``max_length`` itself."""
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    if min_bucket < 1:
        raise ValueError(f"min_bucket must be >= 1, got {min_bucket}")
    out = []
    b = min_bucket
    while b < max_length:
        out.append(b)
        b *= 2
    out.append(max_length)
    return tuple(out)


def bucket_for(n_tokens: int, max_length: int, min_bucket: int = MIN_BUCKET) -> int:
    """The smallest bucket that holds ``n_tokens`` (``n_tokens <= max_length``)."""
    return next(b for b in bucket_lengths(max_length, min_bucket) if b >= n_tokens)


# ----------------------------------------------------------------------------------------------
# encoder


class TextEncoder:
    """Gemma-2 params + config + tokenizer -> Lumina caption features.

    ``dtype`` is the compute dtype (``"bf16"`` default, as ORIG samples; ``"fp32"`` for exactness);
    params are used in the dtype given (the pipeline casts the matrices and the embedding table to bf16
    when computing in bf16: the same outputs, half the memory). NumPy params are put on the default
    device once, here; pass already placed (e.g. sharded) JAX arrays to keep their placement.
    """

    def __init__(self, params: Params, config: Gemma2Config, tokenizer: Any, *, dtype: Any = "bf16",
                 min_bucket: int = MIN_BUCKET, precision: Any = None):
        self.config = config
        self.tokenizer = tokenizer
        if isinstance(dtype, str) and dtype not in _DTYPES:
            raise ValueError(f"text encoder dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
        self.dtype = _DTYPES[dtype] if isinstance(dtype, str) else dtype
        self.min_bucket = int(min_bucket)
        if self.min_bucket < 1:
            raise ValueError(f"min_bucket must be >= 1, got {min_bucket}")
        _check_tokenizer(tokenizer, "TextEncoder")  # also when the caller built the tokenizer
        self.last_truncated = 0  # prompts cut to max_length by the last tokenize call
        self.last_truncated_rows: tuple[int, ...] = ()  # ... and their indices
        self.precision = precision
        if len(tokenizer) > config.vocab_size:
            raise ValueError(f"tokenizer has {len(tokenizer)} tokens but the encoder's vocab_size is "
                             f"{config.vocab_size}")
        self.params = jax.tree.map(lambda x: x if isinstance(x, jax.Array) else jax.device_put(x), params)
        self._compiled: dict[tuple[int, int], Any] = {}
        self.compile_seconds = 0.0  # spent compiling the forward, over all shapes so far

    @classmethod
    def from_pretrained(cls, text_encoder_path: str | os.PathLike, tokenizer_path: str | os.PathLike | None = None,
                        **kwargs: Any) -> "TextEncoder":
        """Load a transformers Gemma-2 directory (or the project's component / pipeline folder); the
        tokenizer defaults to :func:`default_tokenizer_path`."""
        from lumina_jax.convert.gemma2 import load_text_encoder

        config, params = load_text_encoder(text_encoder_path)
        if tokenizer_path is None:
            tokenizer_path = default_tokenizer_path(text_encoder_path)
        return cls(params, config, load_tokenizer(tokenizer_path), **kwargs)

    @property
    def compiled_shapes(self) -> list[tuple[int, int]]:
        """``(batch, bucket)`` pairs compiled so far."""
        return sorted(self._compiled)

    def tokenize(self, prompts: str | Sequence[str], system_prompt: str = DEFAULT_SYSTEM_PROMPT,
                 max_length: int = DEFAULT_MAX_LENGTH, on_truncate: str = "warn", *,
                 label: str = "prompt", empty_is_unconditional: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Right-padded token ids ``(B, bucket)`` int32 and mask ``(B, bucket)`` bool (NumPy).

        Prompts over ``max_length`` tokens are cut to it: with a warning (``on_truncate="warn"``),
        silently (``"quiet"``; :attr:`last_truncated` says how many were cut, :attr:`last_truncated_rows`
        which), or not at all
        (``"error"``: :class:`PromptTooLongError`). ``label`` names the texts in the warning/error
        (e.g. ``"negative prompt"``). An empty prompt is ``""`` without system prompt unless
        ``empty_is_unconditional=False`` (:func:`lumina_jax.text_templates.build_prompt`).
        """
        if on_truncate not in ("warn", "error", "quiet"):
            raise ValueError(f"on_truncate must be 'warn', 'error' or 'quiet', got {on_truncate!r}")
        if isinstance(max_length, bool) or not isinstance(max_length, (int, np.integer)) or max_length < 1:
            raise ValueError(f"max_length must be an integer >= 1, got {max_length!r}")
        if max_length > self.config.max_position_embeddings:
            raise ValueError(f"max_length={max_length} exceeds max_position_embeddings="
                             f"{self.config.max_position_embeddings}")
        if isinstance(prompts, (bytes, bytearray, dict)) or not hasattr(prompts, "__iter__"):
            raise TypeError(f"{label}s must be a string or a list of strings, got {type(prompts).__name__}")
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise ValueError("no prompts given")
        for i, p in enumerate(prompts):
            if not isinstance(p, str):
                raise TypeError(f"{label} {i} is a {type(p).__name__}, not a str")
            if _SURROGATE.search(p):
                raise ValueError(f"{label} {i} is not valid Unicode (a lone surrogate at character "
                                 f"{_SURROGATE.search(p).start()}: undecodable bytes or a broken \\ud8xx escape)")
        texts = [build_prompt(p, system_prompt, empty_is_unconditional=empty_is_unconditional) for p in prompts]
        ids = self.tokenizer(texts, add_special_tokens=True, padding=False, truncation=False)["input_ids"]
        dropped = {i: len(x) - max_length for i, x in enumerate(ids) if len(x) > max_length}
        self.last_truncated = len(dropped)
        self.last_truncated_rows = tuple(sorted(dropped))
        if dropped and on_truncate != "quiet":
            msg = (f"{len(dropped)} of {len(ids)} {label}(s) exceed max_length={max_length} tokens (counting "
                   f"<bos> and the system prompt); tokens over the limit per {label} (index: count): {dropped}")
            if on_truncate == "error":
                raise PromptTooLongError(msg)
            warnings.warn(msg + " -- they were truncated", stacklevel=_user_stacklevel())
        ids = [x[:max_length] for x in ids]
        length = bucket_for(max(len(x) for x in ids), max_length, self.min_bucket)
        out = np.full((len(ids), length), self.tokenizer.pad_token_id, dtype=np.int32)
        mask = np.zeros((len(ids), length), dtype=bool)
        for i, x in enumerate(ids):
            out[i, : len(x)] = x
            mask[i, : len(x)] = True
        return out, mask

    def encode(self, prompts: str | Sequence[str], system_prompt: str = DEFAULT_SYSTEM_PROMPT,
               max_length: int = DEFAULT_MAX_LENGTH, on_truncate: str = "warn") -> tuple[jax.Array, jax.Array]:
        """Caption features ``(B, L, hidden)`` in the compute dtype and mask ``(B, L)`` bool.

        ``L`` is the bucket, not ``max_length``; features at padded positions are zero.
        """
        ids, mask = self.tokenize(prompts, system_prompt, max_length, on_truncate)
        return self.encode_tokens(ids, mask), jnp.asarray(mask)

    def encode_tokens(self, input_ids: np.ndarray, mask: np.ndarray,
                      on_phase: Optional[Callable[[str], None]] = None) -> jax.Array:
        """Run the compiled forward for this ``(batch, length)``, compiling it on first use (the seconds
        add to :attr:`compile_seconds`; ``on_phase("compile")`` / ``on_phase("encode")`` bracket it)."""
        input_ids, mask = np.asarray(input_ids, np.int32), np.asarray(mask, bool)
        if input_ids.ndim != 2 or mask.shape != input_ids.shape:
            raise ValueError(f"input_ids {input_ids.shape} and mask {mask.shape} must both be (batch, length)")
        bad = (input_ids < 0) | (input_ids >= self.config.vocab_size)
        if bad.any():  # jnp.take would read NaN (or wrap) silently, poisoning the whole row
            r, c = np.argwhere(bad)[0]
            raise ValueError(f"token id {int(input_ids[r, c])} at [{r}, {c}] is outside the vocabulary "
                             f"(0..{self.config.vocab_size - 1}); was the tokenizer made for this text encoder?")
        key = tuple(input_ids.shape)
        if key not in self._compiled:
            log.info("compiling the Gemma-2 encoder for batch %d, length %d", *key)
            if on_phase is not None:
                on_phase("compile")
            t0 = time.perf_counter()
            self._compiled[key] = jax.jit(self._forward).lower(self.params, input_ids, mask).compile()
            self.compile_seconds += time.perf_counter() - t0
            if on_phase is not None:
                on_phase("encode")
        return self._compiled[key](self.params, input_ids, mask)

    def _forward(self, params: Params, input_ids: jax.Array, mask: jax.Array) -> jax.Array:
        feats = dit_features(params, input_ids, mask, self.config, dtype=self.dtype, precision=self.precision)
        return jnp.where(mask[..., None], feats, jnp.zeros((), feats.dtype))
