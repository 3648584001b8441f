"""Pure train steps `(state, batch, rng) -> (state, metrics)`, jitted once with explicit
shardings and the state donated (big_vision / MaxText style).

State is a plain dict: {"params", "opt_state", "step"}. Batches are dicts of [B, T] arrays
(see gptjax/data): tokens, segment_ids, positions, loss_mask. Randomness is
`fold_in(rng, step)`, so a resumed run draws the same dropout masks.

Shape legend: B batch, A gradient-accumulation microbatches, M = B // A, T sequence.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from gptjax import lora, losses, sharding
from gptjax.config import need
from gptjax.model import Model

State = dict


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """What one-step-per-batch training consumes (a stage section's batch fields)."""

    batch_size: int = 32  # global batch (all hosts, all devices), in rows of seq_len tokens
    seq_len: int = 64
    steps: int = 300
    # PaLM's z-loss weight (gptjax/losses.py next_token_loss); 0 disables it.
    z_loss: float = 0.0

    def __post_init__(self):
        for name in ("batch_size", "seq_len", "steps"):
            need(getattr(self, name) >= 1, name, f"must be >= 1, got {getattr(self, name)}")


def state_from_params(tx: optax.GradientTransformation, params) -> State:
    """The train state; the optimizer holds moments for the trainable params only
    (gptjax/lora.py: all of them, or a LoRA model's adapters and head)."""
    opt_state = tx.init(lora.trainable(params))
    return {"params": params, "opt_state": opt_state, "step": jnp.zeros((), jnp.int32)}


def init_state(model: Model, tx: optax.GradientTransformation, rng) -> State:
    return state_from_params(tx, model.init(rng))


def opt_state_shardings(tx: optax.GradientTransformation, abstract_params, param_sh, mesh: Mesh):
    """Shardings of tx's state for params sharded as param_sh, from shapes alone: moments
    mirror their params; scalars (counts) are replicated."""
    abstract_opt = jax.eval_shape(tx.init, lora.trainable(abstract_params))
    return optax.tree_map_params(
        tx,
        lambda _, s: s,
        abstract_opt,
        lora.trainable(param_sh),
        transform_non_params=lambda _: sharding.replicated(mesh),
    )


def state_shardings(model: Model, tx: optax.GradientTransformation, mesh: Mesh):
    """Shardings for the whole train state, from shapes alone (nothing is allocated)."""
    param_sh = sharding.param_shardings(mesh, model.logical_axes, model.abstract_params)
    return {
        "params": param_sh,
        "opt_state": opt_state_shardings(tx, model.abstract_params, param_sh, mesh),
        "step": sharding.replicated(mesh),
    }


def jit_init(model: Model, tx: optax.GradientTransformation, mesh: Mesh):
    """(init, shardings): `init(rng)` builds the train state under jit with its shardings
    as out_shardings, so each device materialises only its own shard of params and
    moments (they never exist whole on one device)."""
    shardings = state_shardings(model, tx, mesh)
    init = jax.jit(functools.partial(init_state, model, tx), out_shardings=shardings)
    return init, shardings


def _global_norm(tree):
    return optax.global_norm(jax.tree.map(lambda x: x.astype(jnp.float32), tree))


def grad_of_trainable(loss_fn: Callable, params):
    """(value_and_grad of loss_fn as a function of lora.trainable(params), that view).
    Without adapters the view is params and this is plain value_and_grad."""
    view = lora.trainable(params)
    if view is params:
        return jax.value_and_grad(loss_fn, has_aux=True), view

    def on_view(v, *args):
        return loss_fn(lora.combine(v, params), *args)

    return jax.value_and_grad(on_view, has_aux=True), view


def accumulate_grads(loss_fn: Callable, params, batch, grad_accum_steps: int):
    """Sums (value, grad) of loss_fn over A microbatches in a lax.scan; gradients of the
    trainable params only (`grad_of_trainable`).

    loss_fn(params, microbatch, index) -> (loss_sum, (count, aux_sums)); every output is a
    sum, so accumulation is exact: the result equals one pass over the whole batch.
    """
    grad_fn, params = grad_of_trainable(loss_fn, params)
    if grad_accum_steps == 1:
        return grad_fn(params, batch, 0)
    a = grad_accum_steps
    micro = jax.tree.map(lambda x: x.reshape(a, x.shape[0] // a, *x.shape[1:]), batch)

    def body(carry, xs):
        out = grad_fn(params, *xs)
        return jax.tree.map(jnp.add, carry, out), None

    first = (jax.tree.map(lambda x: x[0], micro), 0)
    zero = jax.tree.map(jnp.zeros_like, jax.eval_shape(grad_fn, params, *first))
    out, _ = jax.lax.scan(body, zero, (micro, jnp.arange(a)))
    return out


def apply_update(state: State, grads, tx, schedule, skip_nonfinite: bool, finite):
    """One optimizer update plus the norms big_vision logs by default.

    A non-finite loss or gradient with skip_nonfinite leaves params and optimizer state
    unchanged (selected inside the jit: no host sync), and is counted in the metrics.
    """
    params = lora.trainable(state["params"])  # grads are of this view
    updates, opt_state = tx.update(grads, state["opt_state"], params)
    new_params = optax.apply_updates(params, updates)
    if skip_nonfinite:
        keep = lambda new, old: jnp.where(finite, new, old)
        new_params = jax.tree.map(keep, new_params, params)
        opt_state = jax.tree.map(keep, opt_state, state["opt_state"])
    new_params = lora.combine(new_params, state["params"])
    metrics = {
        "grad_norm": _global_norm(grads),
        "update_norm": _global_norm(updates),
        "param_norm": _global_norm(new_params),
        "lr": schedule(state["step"]),
        "nonfinite": 1.0 - finite.astype(jnp.float32),
    }
    new_state = {"params": new_params, "opt_state": opt_state, "step": state["step"] + 1}
    return new_state, metrics


def finish_step(state: State, loss_sum, count, grads, tx, schedule, skip_nonfinite: bool):
    """The end of every one-step-per-batch train step: the summed loss and gradients
    divided by the count (so microbatches and hosts combine exactly), the finite check, the
    optimizer update. Returns (state, metrics with the mean loss)."""
    denom = jnp.maximum(count, 1.0)
    grads = jax.tree.map(lambda g: g / denom, grads)
    loss = loss_sum / denom
    finite = jnp.isfinite(loss) & jnp.isfinite(_global_norm(grads))
    state, metrics = apply_update(state, grads, tx, schedule, skip_nonfinite, finite)
    metrics["loss"] = loss
    return state, metrics


def lm_train_step(
    state: State,
    batch,
    rng,
    *,
    model: Model,
    tx,
    schedule,
    z_loss: float = 0.0,
    grad_accum_steps: int = 1,
    skip_nonfinite: bool = True,
):
    """Next-token LM step for pretraining and SFT (SFT differs only in batch['loss_mask'])."""
    rng = jax.random.fold_in(rng, state["step"])

    def loss_fn(params, mb, index):
        mb_rng = jax.random.fold_in(rng, index)
        logits = model.apply(
            params,
            mb["tokens"],
            mb.get("segment_ids"),  # absent: one document per row (Model.__call__)
            mb.get("positions"),
            rng=mb_rng if model.cfg.dropout > 0 else None,
        )
        mask = losses.target_mask(mb.get("segment_ids"), mb["loss_mask"], mb["tokens"].shape)
        loss_sum, count, aux = losses.next_token_loss(logits, mb["tokens"], mask, z_loss)
        return loss_sum, (count, aux)

    (loss_sum, (count, aux)), grads = accumulate_grads(
        loss_fn, state["params"], batch, grad_accum_steps
    )
    state, metrics = finish_step(state, loss_sum, count, grads, tx, schedule, skip_nonfinite)
    denom = jnp.maximum(count, 1.0)
    metrics.update(nll=aux["nll_sum"] / denom, accuracy=aux["correct_sum"] / denom, tokens=count)
    return state, metrics


def lm_eval_step(params, batch, *, model: Model):
    """Summed held-out loss; the caller divides after summing over batches."""
    logits = model.apply(params, batch["tokens"], batch["segment_ids"], batch["positions"])
    mask = losses.target_mask(batch["segment_ids"], batch["loss_mask"])
    loss_sum, count, aux = losses.next_token_loss(logits, batch["tokens"], mask)
    return {"loss_sum": loss_sum, "count": count, "correct_sum": aux["correct_sum"]}


def jit_train_step(step_fn: Callable, mesh: Mesh, shardings):
    """jit with explicit in/out shardings (what pjit became), the state donated, and the
    step traced under the mesh so that its activations are constrained by name."""
    batch_sh = sharding.batch_sharding(mesh)
    rep = sharding.replicated(mesh)
    return jax.jit(
        sharding.with_mesh(step_fn, mesh),
        in_shardings=(shardings, batch_sh, rep),
        out_shardings=(shardings, rep),
        donate_argnums=0,
    )


def jit_eval_step(eval_fn: Callable, mesh: Mesh, param_shardings):
    return jax.jit(
        sharding.with_mesh(eval_fn, mesh),
        in_shardings=(param_shardings, sharding.batch_sharding(mesh)),
        out_shardings=sharding.replicated(mesh),
    )
