"""The trainer of every stage that takes one jitted step per batch: pretraining, SFT and
the reward model. It owns the model, the optimizer, the sharded train state and the two
jitted functions (train step, eval step); the stage loop (experiments/loop.py) drives it.

The objective is a pair of unjitted step functions, `(model, tx, schedule) -> (train_step,
eval_step)`: next-token (default, gptjax/train_steps.py) or the RM's ranking loss
(gptjax/reward_model.py `make_steps`).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax

from gptjax import lora, sharding, train_steps
from gptjax.config import from_dict
from gptjax.errors import ConfigError
from gptjax.model import Model, ModelConfig
from gptjax.optim import OptimConfig, make_optimizer
from gptjax.train_steps import TrainConfig

TRAIN_FIELDS = ("batch_size", "seq_len", "steps", "z_loss")


def section_configs(section, prefix: str) -> tuple[TrainConfig, OptimConfig]:
    """(batch fields, optimizer) of a stage's config section, validated."""
    train = from_dict(TrainConfig, {name: section[name] for name in TRAIN_FIELDS}, prefix)
    return train, from_dict(OptimConfig, section.optim, f"{prefix}.optim")


def check_fits(mesh, train: TrainConfig, optim: OptimConfig, model: ModelConfig, prefix: str):
    """The batch divides into microbatches over the data-parallel axes; rows fit the model."""
    sharding.check_batch(
        mesh, train.batch_size, f"{prefix}.batch_size", optim.grad_accum_steps, "grad_accum_steps"
    )
    if train.seq_len > model.max_len:
        raise ConfigError(
            f"{prefix}.seq_len", f"{train.seq_len} exceeds model.max_len={model.max_len}"
        )


def lm_steps(model: Model, tx, schedule, *, z_loss: float = 0.0, grad_accum_steps: int = 1):
    """The next-token objective: (train_step, eval_step), unjitted."""
    step = functools.partial(
        train_steps.lm_train_step,
        model=model,
        tx=tx,
        schedule=schedule,
        z_loss=z_loss,
        grad_accum_steps=grad_accum_steps,
    )
    return step, functools.partial(train_steps.lm_eval_step, model=model)


@dataclasses.dataclass
class LMTrainer:
    """Model, optimizer, sharded state and jitted steps for one-step-per-batch training."""

    model: Model
    mesh: jax.sharding.Mesh
    tx: object
    shardings: dict
    init_state: Callable
    train_step: Callable
    eval_step: Callable

    @classmethod
    def build(
        cls,
        model_cfg: ModelConfig,
        optim: OptimConfig,
        train: TrainConfig,
        mesh,
        seed: int,
        init_params=None,
        make_steps: Callable | None = None,
    ) -> LMTrainer:
        """init_params: start from these (sharded) params, e.g. the base model for SFT;
        None initialises from `seed`. make_steps: `(model, tx, schedule) -> (train_step,
        eval_step)`, unjitted, for other objectives on the same machinery (the RM);
        default the next-token steps."""
        model = Model(model_cfg)
        tx, schedule = make_optimizer(optim, train.steps)
        init, shardings = train_steps.jit_init(model, tx, mesh)
        if init_params is None:
            init_state = functools.partial(init, jax.random.key(seed))
        else:
            if model_cfg.lora_rank and not lora.has_adapters(init_params):
                # LoRA on a model trained without: fresh adapters, the function unchanged.
                init_params = lora.add_adapters(
                    init_params, model_cfg, jax.random.key(seed), shardings["params"]
                )
            init = jax.jit(
                functools.partial(train_steps.state_from_params, tx), out_shardings=shardings
            )
            init_state = functools.partial(init, init_params)
        if make_steps is None:
            make_steps = functools.partial(
                lm_steps, z_loss=train.z_loss, grad_accum_steps=optim.grad_accum_steps
            )
        step, eval_step = make_steps(model, tx, schedule)
        return cls(
            model,
            mesh,
            tx,
            shardings,
            init_state,
            train_steps.jit_train_step(step, mesh, shardings),
            train_steps.jit_eval_step(eval_step, mesh, shardings["params"]),
        )

    def put_batch(self, host_batch):
        return sharding.global_batch(self.mesh, host_batch)

    def step_fn(self):
        """(state, host batch, rng) -> (state, metrics), placing the batch on the mesh."""
        return lambda state, batch, rng: self.train_step(state, self.put_batch(batch), rng)

    def eval_fn(self, batches: list[dict]):
        """Held-out loss and accuracy over fixed batches (sums, then one division)."""
        placed = [self.put_batch(b) for b in batches]

        def evaluate(params):
            totals = {"loss_sum": 0.0, "count": 0.0, "correct_sum": 0.0}
            for b in placed:
                out = jax.device_get(self.eval_step(params, b))
                totals = {k: totals[k] + float(out[k]) for k in totals}
            n = max(totals["count"], 1.0)
            return {
                "loss": totals["loss_sum"] / n,
                "accuracy": totals["correct_sum"] / n,
                "tokens": totals["count"],
            }

        return evaluate
