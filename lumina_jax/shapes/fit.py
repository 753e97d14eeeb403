"""The small training loop shared by the shapes model's encoder trainers (autoencoder, text encoder)."""

from __future__ import annotations

from typing import Any, Callable


def adamw_cosine(lr: float, warmup: int, steps: int, *, b2: float = 0.99, clip_norm: float = 1.0) -> Any:
    """Clipped AdamW (no weight decay) with a linear warmup to ``lr`` and a cosine decay to ``lr / 20``."""
    import optax

    sched = optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(steps, warmup + 1), 0.05 * lr)
    return optax.chain(optax.clip_by_global_norm(clip_norm), optax.adamw(sched, b2=b2, weight_decay=0.0))


def run_steps(steps: int, one_step: Callable[[int], dict[str, Any]], *, desc: str, every: int = 50,
              progress: bool = True) -> list[dict[str, float]]:  # fmt: skip
    """Call ``one_step(i)`` for ``i < steps``; it returns scalars (device arrays are fine). Every ``every``
    steps and at the last one they are fetched, shown on a progress bar and kept; returns that history."""
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc=desc, unit="step", mininterval=5.0)
    hist: list[dict[str, float]] = []
    for i in range(steps):
        logs = one_step(i)
        if i % every == 0 or i == steps - 1:
            hist.append({"step": i, **{k: float(v) for k, v in logs.items()}})
            if bar is not None:
                bar.set_postfix({k: f"{v:.4g}" for k, v in hist[-1].items() if k != "step"})
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return hist
