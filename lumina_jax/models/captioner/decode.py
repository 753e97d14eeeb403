"""Batched autoregressive decoding for the captioner, one jit-compiled program per shape.

:func:`generate` runs, inside one ``jax.jit``: the vision tower, the prompt prefill into a preallocated KV
cache of ``P + max_new_tokens`` slots, then a ``lax.while_loop`` of single-token decode steps that stops
when every row has emitted a stop token or ``max_new_tokens`` tokens exist. Rows have their own prompt
lengths (left padding, ``kv_start``) and M-RoPE offsets (``next_position``: after an image the text
positions run ahead of the slot index, like HF's ``rope_deltas``).

Sampling per step (HF order): first the repetition penalty (HF's ``RepetitionPenaltyLogitsProcessor``: the
logit of every token already in the row -- its prompt, image placeholder tokens included, and what it has
generated -- is divided by ``repetition_penalty`` when positive, multiplied when negative; a row's left
padding does not count, so each row decodes as it would alone, where HF's batched ``generate`` would also
penalise the padding token); then ``temperature == 0`` is greedy (``argmax``; ties -> lowest id, as torch);
otherwise logits / temperature, then top-k (tokens tied with the k-th logit stay, as HF), then top-p (HF's
``TopPLogitsWarper``: sort ascending, stable, drop the tokens whose cumulative mass is ``<= 1 - top_p``, keep
at least the last one; of tokens tied at the cut-off only those needed by sorted order stay, i.e. the ones
with the higher ids), then a categorical draw.
After a row stops it emits ``pad_token_id``.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp

from lumina_jax.models.captioner.config import CaptionerConfig
from lumina_jax.models.captioner.language import init_cache
from lumina_jax.models.captioner.model import Params, PromptBatch, QwenVL


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
    """Decoding settings (hashable: one compiled program per distinct value)."""

    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 -> greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 -> off
    stop_token_ids: tuple[int, ...] = ()
    pad_token_id: int = 0
    repetition_penalty: float = 1.0  # 1 -> off; transformers' ``repetition_penalty`` (greedy too)

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.repetition_penalty < float("inf"):
            raise ValueError(f"repetition_penalty must be a positive number, got {self.repetition_penalty}")


class GenerateOutput(NamedTuple):
    tokens: jax.Array  # (B, max_new_tokens) int32; pad_token_id after a row's stop token
    lengths: jax.Array  # (B,) int32: tokens emitted, the stop token included
    finished: jax.Array  # (B,) bool: the row emitted a stop token


def sample_logits(logits: jax.Array, rng: jax.Array, gen: GenerationConfig,
                  seen: Optional[jax.Array] = None) -> jax.Array:
    """``(B, V)`` fp32 logits -> ``(B,)`` int32 token ids under ``gen``'s sampling settings; ``seen``
    (``(B, V)`` bool, needed when ``gen.repetition_penalty != 1``) marks the tokens the penalty applies to."""
    if gen.repetition_penalty != 1.0:
        if seen is None:
            raise ValueError("repetition_penalty needs the tokens seen so far (seen=)")
        logits = logits.astype(jnp.float32)
        penalised = jnp.where(logits < 0, logits * gen.repetition_penalty, logits / gen.repetition_penalty)
        logits = jnp.where(seen, penalised, logits)
    if gen.temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / gen.temperature
    neg = jnp.finfo(jnp.float32).min
    if gen.top_k and gen.top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, gen.top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, neg, logits)
    if gen.top_p < 1.0:
        logits = jnp.where(top_p_mask(logits, gen.top_p), logits, neg)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def top_p_mask(logits: jax.Array, top_p: float) -> jax.Array:
    """``(..., V)`` bool: the tokens transformers' ``TopPLogitsWarper(top_p, min_tokens_to_keep=1)`` keeps.

    Sort ascending (stable: tied logits stay in id order), take the cumulative softmax mass and drop every
    sorted token whose cumulative mass is ``<= 1 - top_p``; the last (most likely) one always stays. So
    the kept set is the minimal prefix of the descending order that reaches ``top_p``, and a tie at the
    cut-off keeps only as many tied tokens as needed (those later in sorted order, i.e. higher ids). That is
    HF's result exactly where torch sorts stably (up to 16 tokens, or ``stable=True``); above that torch's
    default sort orders tied logits arbitrarily, and HF keeps the same number of them, not always the same ids.
    """
    order = jnp.argsort(logits, axis=-1, stable=True)  # ascending
    srt = jnp.take_along_axis(logits, order, axis=-1)
    cum = jnp.cumsum(jax.nn.softmax(srt, axis=-1), axis=-1)
    drop = (cum <= 1.0 - top_p).at[..., -1].set(False)
    return jnp.put_along_axis(jnp.ones(logits.shape, bool), order, ~drop, axis=-1, inplace=False)


@functools.partial(jax.jit, static_argnames=("config", "gen", "dtype", "precision", "attention_backend",
                                             "decode_attention_backend"))
def _generate(params: Params, batch: PromptBatch, rng: jax.Array, active: jax.Array, stops: jax.Array, *,
              config: CaptionerConfig,
              gen: GenerationConfig, dtype: Any, precision: Any, attention_backend: str,
              decode_attention_backend: str) -> GenerateOutput:
    model = QwenVL(config, dtype=dtype, precision=precision, attention_backend=attention_backend,
                   decode_attention_backend=decode_attention_backend)
    variables = {"params": params}
    B, P = batch.input_ids.shape
    T = gen.max_new_tokens
    cache = init_cache(config.text, B, P + T, dtype)
    h, cache = model.apply(variables, batch, cache, method=QwenVL.prefill)
    logits = model.apply(variables, h[:, -1], method=QwenVL.logits)
    rng, sub = jax.random.split(rng)
    seen = None  # (B, V) bool: the tokens each row holds, for the repetition penalty
    if gen.repetition_penalty != 1.0:
        V = logits.shape[-1]
        rows = jnp.arange(B)[:, None]
        prompt = jnp.where(jnp.arange(P)[None, :] >= batch.kv_start[:, None], batch.input_ids, V)  # padding: none
        seen = jnp.zeros((B, V), bool).at[rows, prompt].set(True, mode="drop")
    tok = sample_logits(logits, sub, gen, seen)
    mark = lambda seen, t: None if seen is None else seen.at[jnp.arange(B), t].set(True)  # noqa: E731

    is_stop = lambda t: jnp.any(t[:, None] == stops[None, :], axis=-1)  # noqa: E731
    done = ~active | is_stop(tok)
    tok = jnp.where(active, tok, gen.pad_token_id)
    tokens = jnp.full((B, T), gen.pad_token_id, jnp.int32).at[:, 0].set(tok)
    lengths = active.astype(jnp.int32)
    seen = mark(seen, tok)

    def cond(state):
        step, _, _, _, done, _, _, _ = state
        return (step < T) & ~jnp.all(done)

    def body(state):
        step, tok, tokens, lengths, done, cache, rng, seen = state
        logits, cache = model.apply(variables, tok, batch.next_position + step - 1, P + step - 1, batch.kv_start,
                                    cache, method=QwenVL.decode_step)
        rng, sub = jax.random.split(rng)
        new = jnp.where(done, gen.pad_token_id, sample_logits(logits, sub, gen, seen))
        tokens = jax.lax.dynamic_update_slice(tokens, new[:, None], (jnp.zeros((), jnp.int32), step))
        lengths = lengths + (~done).astype(jnp.int32)
        done = done | is_stop(new)
        return step + 1, new, tokens, lengths, done, cache, rng, mark(seen, new)

    state = (jnp.ones((), jnp.int32), tok, tokens, lengths, done, cache, rng, seen)
    _, _, tokens, lengths, done, _, _, _ = jax.lax.while_loop(cond, body, state)
    return GenerateOutput(tokens, lengths, active & done)  # an active row is only ever done by a stop token


def generate(params: Params, batch: PromptBatch, config: CaptionerConfig, gen: GenerationConfig,
             rng: Optional[jax.Array] = None, *, active: Any = None, dtype: Any = jnp.float32,
             precision: Any = None, attention_backend: str = "auto",
             decode_attention_backend: str = "xla") -> GenerateOutput:
    """Caption a batch: vision tower, prefill and the decode loop in one compiled program.

    Args:
      params: ``{"visual": ..., "language_model": ...}`` (fp32 or cast; placed/sharded by the caller).
      batch: a :class:`PromptBatch` (NumPy or device arrays; its shapes select the compiled program).
      gen: decoding settings; ``stop_token_ids`` usually the model's eos ids (``<|im_end|>``).
      rng: a PRNG key for sampling (ignored when greedy; default ``PRNGKey(0)``).
      active: optional ``(B,)`` bool; inactive (padding) rows stop at once and emit only padding.
      dtype: compute dtype (``jnp.bfloat16`` on accelerators; the KV cache uses it too).
      attention_backend / decode_attention_backend: vision tower / LM decode steps (see :class:`QwenVL`).
    """
    B = batch.input_ids.shape[0]
    active = jnp.ones((B,), bool) if active is None else jnp.asarray(active, bool)
    rng = jax.random.PRNGKey(0) if rng is None else rng
    # stop ids are traced, not static: changing them does not recompile
    stops = jnp.asarray(gen.stop_token_ids or (-1,), jnp.int32)
    return _generate(params, batch, rng, active, stops, config=config,
                     gen=dataclasses.replace(gen, stop_token_ids=()), dtype=dtype, precision=precision,
                     attention_backend=attention_backend, decode_attention_backend=decode_attention_backend)
