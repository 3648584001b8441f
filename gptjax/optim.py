"""AdamW with warmup and cosine/linear decay, global-norm clipping, and a weight-decay mask.

Gradient accumulation is not an optax wrapper here: the train steps split the batch into
microbatches and sum gradients in a `lax.scan` (one optimizer update per step, and the
optimizer state keeps one meaning whatever the accumulation).
"""

from __future__ import annotations

import dataclasses

import jax
import optax

from gptjax.config import need

# Norm gains and biases are not decayed (GPT-2/nanoGPT: decay only matmul weights and
# embeddings), since shrinking a norm's scale toward 0 fights the normalisation itself.
NO_DECAY_NAMES = ("scale", "bias", "score_b", "score_logp", "bq", "bk", "bv", "bo", "b_gate")
NO_DECAY_NAMES += ("b_up", "b_down")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW (decoupled weight decay) with a warmup-then-decay learning rate."""

    lr: float = 3e-3  # peak learning rate
    warmup_steps: int = 50  # linear warmup from 0
    schedule: str = "cosine"  # cosine | linear | constant, after warmup
    min_lr_ratio: float = 0.1  # final lr = lr * min_lr_ratio
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1  # on matmul weights and embeddings only (NO_DECAY_NAMES)
    clip_norm: float = 1.0  # global gradient-norm clipping; 0 disables it
    # Microbatches per step, their gradients summed in a lax.scan (gptjax/train_steps.py).
    grad_accum_steps: int = 1

    def __post_init__(self):
        need(self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        need(self.warmup_steps >= 0, "warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        need(
            self.schedule in ("cosine", "linear", "constant"),
            "schedule",
            f"{self.schedule!r} not in cosine|linear|constant",
        )
        need(
            0 <= self.min_lr_ratio <= 1,
            "min_lr_ratio",
            f"must be in [0, 1], got {self.min_lr_ratio}",
        )
        need(0 <= self.b1 < 1 and 0 <= self.b2 < 1, "b1", "betas must be in [0, 1)")
        need(self.weight_decay >= 0, "weight_decay", f"must be >= 0, got {self.weight_decay}")
        need(self.clip_norm >= 0, "clip_norm", f"must be >= 0, got {self.clip_norm}")
        need(
            isinstance(self.grad_accum_steps, int) and self.grad_accum_steps >= 1,
            "grad_accum_steps",
            f"must be an int >= 1, got {self.grad_accum_steps}",
        )


def lr_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))
    decay_steps = max(total_steps - warmup, 1)
    end = cfg.lr * cfg.min_lr_ratio
    if cfg.schedule == "cosine":
        decay = optax.cosine_decay_schedule(cfg.lr, decay_steps, alpha=cfg.min_lr_ratio)
    elif cfg.schedule == "linear":
        decay = optax.linear_schedule(cfg.lr, end, decay_steps)
    else:
        decay = optax.constant_schedule(cfg.lr)
    if warmup == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, warmup), decay], [warmup])


def decay_mask(params):
    """True for params that get weight decay (by the leaf's name)."""

    def keep(path, _):
        return getattr(path[-1], "key", None) not in NO_DECAY_NAMES

    return jax.tree_util.tree_map_with_path(keep, params)


def make_optimizer(cfg: OptimConfig, total_steps: int):
    """Returns (optax transformation, lr schedule)."""
    schedule = lr_schedule(cfg, total_steps)
    parts = []
    if cfg.clip_norm > 0:
        parts.append(optax.clip_by_global_norm(cfg.clip_norm))
    parts.append(
        optax.adamw(
            schedule,
            b1=cfg.b1,
            b2=cfg.b2,
            eps=cfg.eps,
            weight_decay=cfg.weight_decay,
            mask=decay_mask,
        )
    )
    return optax.chain(*parts), schedule
