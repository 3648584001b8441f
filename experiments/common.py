"""What every stage runner shares: data sources, the tokenizer, the mesh, the LM trainer.

Stages find their inputs in the same workdir (`<workdir>/<stage>/checkpoints`,
`<workdir>/tokenizer/spm.model`, `<workdir>/data`) or at explicit paths in the config.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import TypeVar

import jax
import ml_collections
import numpy as np

from experiments.loop import LoopConfig
from gptjax import config as config_lib
from gptjax import sharding, train_steps
from gptjax.config import TrainConfig
from gptjax.data import builders, formats
from gptjax.data import tokenizer as tok_lib
from gptjax.errors import ConfigError
from gptjax.model import Model, ModelConfig
from gptjax.optim import OptimConfig, make_optimizer
from gptjax.world import WorldConfig, generate

WORLD = "world"
T = TypeVar("T")


def stage_dir(workdir: str, stage: str) -> str:
    return os.path.join(workdir, stage)


def data_dir(config, workdir: str) -> str:
    return config.data.data_dir or os.path.join(workdir, "data")


def world_config(config) -> WorldConfig:
    fields = config.world.to_dict()
    fields["skill_mix"] = tuple(fields["skill_mix"])
    fields["seed"] = config.seeds.world
    try:
        return config_lib.from_dict(WorldConfig, fields, "world")
    except ValueError as e:  # WorldConfig.__post_init__ names the field
        raise ConfigError("world", str(e)) from None


def world_data(config, workdir: str) -> dict[str, Sequence[dict]]:
    """The generated world as TFDS array_record splits (prepared once per content hash)."""
    cfg = world_config(config)
    initialize_distributed(config)
    return process_0_first(
        "world data",
        lambda: builders.build_records(
            "world",
            lambda: generate(cfg),
            {"world": cfg.to_dict(), "hash": cfg.content_hash()},
            data_dir(config, workdir),
        ),
    )


def pretrain_sources(config, workdir: str) -> tuple[Sequence, Sequence]:
    """(train, held-out) pretraining documents from the world or the user's corpus."""
    spec = config.data.pretrain
    if spec == WORLD:
        world = world_data(config, workdir)
        return world["pretrain"], world["pretrain_heldout"]
    return split_user_file(
        "data.pretrain",
        spec,
        config.data.pretrain_heldout_fraction,
        data_dir(config, workdir),
        max_bad_fraction(config),
    )


def max_bad_fraction(config) -> float:
    """data.max_bad_fraction: the share of malformed records of a user's file that are
    dropped (each reported) rather than failing; 0 (the default) = none."""
    value = config.data.get("max_bad_fraction", 0.0)
    if not isinstance(value, int | float) or not 0 <= value < 1:
        raise ConfigError("data.max_bad_fraction", f"must be in [0, 1), got {value!r}")
    return float(value)


def split_user_file(
    field: str, spec: str, heldout_fraction: float, ddir: str, max_bad_fraction: float = 0.0
):
    """(train, held-out) slices of a user's dataset; errors name the config field."""
    if not 0 < heldout_fraction < 1:
        raise ConfigError(f"{field}_heldout_fraction", f"must be in (0, 1), got {heldout_fraction}")
    pct = max(1, round(100 * heldout_fraction))

    def load():
        train = builders.load_split(spec, f"train[:{100 - pct}%]", ddir)
        return train, builders.load_split(spec, f"train[{100 - pct}%:]", ddir)

    try:
        with formats.drop_bad_records(max_bad_fraction) as dropped:
            train, heldout = process_0_first(field, load)
    except ValueError as e:
        raise ConfigError(field, str(e)) from None
    if dropped:
        print(
            f"{field}: dropped {len(dropped)} malformed records (data.max_bad_fraction="
            f"{max_bad_fraction}), the first: {dropped[0]}",
            file=sys.stderr,
        )
    if len(train) == 0 or len(heldout) == 0:
        raise ConfigError(
            field,
            f"{spec} has too few records to hold out {pct}% for "
            f"evaluation ({len(train)} train, {len(heldout)} held out)",
        )
    return train, heldout


def _texts(source: Sequence, limit_chars: int = 20_000_000):
    n = 0
    for i in range(len(source)):
        text = source[i]["text"] if isinstance(source[i], dict) else str(source[i])
        yield text
        n += len(text)
        if n >= limit_chars:
            return


def get_tokenizer(config, workdir: str, corpus: Sequence | None = None) -> tok_lib.Tokenizer:
    """Loads config.tokenizer.path, or the workdir's, or trains one on the corpus (process 0
    first); every process of a multi-host run must end up with the same one."""
    initialize_distributed(config)
    tokenizer = process_0_first(
        "tokenizer", lambda: _load_or_train_tokenizer(config, workdir, corpus)
    )
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.assert_equal(
            np.frombuffer(bytes.fromhex(tokenizer.hash), np.uint8),
            f"processes loaded different tokenizers (this one: {tokenizer.hash[:12]})",
        )
    return tokenizer


def _load_or_train_tokenizer(config, workdir: str, corpus: Sequence | None):
    if config.tokenizer.path:
        if not os.path.exists(config.tokenizer.path):
            raise ConfigError("tokenizer.path", f"no such file: {config.tokenizer.path}")
        return tok_lib.load_tokenizer(config.tokenizer.path)
    path = os.path.join(workdir, "tokenizer", "spm.model")
    if corpus is None:
        if not os.path.exists(path):
            raise FileNotFoundError(
                f"no tokenizer at {path}: run the pretrain stage first, "
                f"or set --config.tokenizer.path"
            )
        return tok_lib.load_tokenizer(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    return tok_lib.train_tokenizer(
        _texts(corpus), path, config.tokenizer.vocab_size, model_type=config.tokenizer.model_type
    )


def model_config(config, tokenizer: tok_lib.Tokenizer | None, head: str = "lm") -> ModelConfig:
    """The model section with the vocab resolved from the tokenizer (padded). tokenizer
    None (ahead-of-time compiles, experiments/aot.py): the size it will be trained to,
    config.tokenizer.vocab_size."""
    fields = config.model.to_dict()
    vocab = tokenizer.vocab_size if tokenizer is not None else config.tokenizer.vocab_size
    if fields["vocab_size"] == 0:
        fields["vocab_size"] = tok_lib.padded_vocab_size(vocab, config.tokenizer.pad_vocab_to)
    else:
        try:
            tok_lib.check_vocab(vocab, fields["vocab_size"])
        except ValueError as e:
            raise ConfigError("model.vocab_size", str(e)) from None
    fields["head"] = head
    return config_lib.from_dict(ModelConfig, fields, "model")


def initialize_distributed(config) -> sharding.MeshConfig:
    """Joins the other processes of a multi-host run (see sharding.MeshConfig); a no-op
    otherwise. Must run before anything touches a device, hence in every helper here
    that a stage may call first."""
    mesh_cfg = config_lib.from_dict(sharding.MeshConfig, config.mesh, "mesh")
    sharding.maybe_initialize_distributed(mesh_cfg)
    return mesh_cfg


def process_0_first(what: str, prepare: Callable[[], T]) -> T:
    """prepare() on process 0, then on the other processes once it has finished (after
    `initialize_distributed`: without it every process thinks it is alone).

    Preparing data or training the tokenizer writes into the workdir, and two processes
    writing one path race (tfds renames its temporary directory onto one that is already
    there). On a shared workdir the others then only load what process 0 wrote; on a
    host-local one each prepares its own copy, identical because preparation is
    deterministic (get_tokenizer checks).
    """
    if jax.process_count() == 1:
        return prepare()
    from jax.experimental import multihost_utils

    if jax.process_index() != 0:
        multihost_utils.sync_global_devices(f"gptjax: {what} prepared")
        return prepare()
    try:
        return prepare()
    finally:  # also on an error, which the others then meet themselves, not a hang
        multihost_utils.sync_global_devices(f"gptjax: {what} prepared")


def on_process_0(what: str, fn: Callable[[], T]) -> T | None:
    """fn() on process 0 only, the others waiting until it is done (None for them).

    For files every process would write alike (results, gates, reports, comparisons) into
    the shared workdir of a multi-host run: one writer, and nobody reads a half-written file.
    """
    if jax.process_count() == 1:
        return fn()
    from jax.experimental import multihost_utils

    try:
        return fn() if jax.process_index() == 0 else None
    finally:
        multihost_utils.sync_global_devices(f"gptjax: {what} written")


def write_text(path: str, text: str) -> None:
    """Atomically (temporary file + rename) writes `text` to `path`, from process 0 only."""

    def write():
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)

    on_process_0(path, write)


def write_json(path: str, obj, **dump_kwargs) -> None:
    write_text(path, json.dumps(obj, **{"indent": 2, **dump_kwargs}))


def make_mesh(config):
    return sharding.make_mesh(initialize_distributed(config))


def stage_train_config(section, prefix: str) -> tuple[TrainConfig, OptimConfig, LoopConfig]:
    s = section
    train = config_lib.from_dict(
        TrainConfig,
        dict(batch_size=s.batch_size, seq_len=s.seq_len, steps=s.steps, z_loss=s.z_loss),
        prefix,
    )
    optim = config_lib.from_dict(OptimConfig, s.optim, f"{prefix}.optim")
    return train, optim, loop_config(s, prefix, s.steps, s.batch_size * s.seq_len)


def loop_config(section, prefix: str, steps: int, tokens_per_step: int = 0) -> LoopConfig:
    """The shared loop's settings (checkpoints, eval, logging, non-finite policy) of a
    stage section, validated; `steps` is what the stage counts (PPO: iterations)."""
    loop = LoopConfig(
        steps=steps,
        checkpoint_every=section.checkpoint_every,
        keep_checkpoints=section.keep_checkpoints,
        eval_every=section.eval_every,
        log_every=section.log_every,
        nonfinite=section.nonfinite,
        tokens_per_step=tokens_per_step,
    )
    if loop.nonfinite not in ("skip", "stop"):
        raise ConfigError(f"{prefix}.nonfinite", f"{loop.nonfinite!r} not in skip|stop")
    if loop.checkpoint_every < 1:
        raise ConfigError(
            f"{prefix}.checkpoint_every", f"must be >= 1, got {loop.checkpoint_every}"
        )
    return loop


def check_fits(train: TrainConfig, optim: OptimConfig, model: ModelConfig, mesh, prefix: str):
    # The mesh spans every process's devices, so this also splits the batch over processes.
    per = sharding.data_parallel_size(mesh) * optim.grad_accum_steps
    if train.batch_size % per:
        raise ConfigError(
            f"{prefix}.batch_size",
            f"{train.batch_size} is not divisible by data-parallel size x grad_accum_steps = {per}",
        )
    sharding.host_batch_slice(train.batch_size, mesh)  # each process holds its own rows
    if train.seq_len > model.max_len:
        raise ConfigError(
            f"{prefix}.seq_len", f"{train.seq_len} exceeds model.max_len={model.max_len}"
        )


@dataclasses.dataclass
class LMTrainer:
    """Model, optimizer, sharded state and jitted steps for next-token training."""

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
        shardings = train_steps.state_shardings(model, tx, mesh)

        def from_params(params):
            return {
                "params": params,
                "opt_state": tx.init(params),
                "step": jax.numpy.zeros((), jax.numpy.int32),
            }

        if init_params is None:
            init = jax.jit(lambda rng: from_params(model.init(rng)), out_shardings=shardings)
            init_state = functools.partial(init, jax.random.key(seed))
        else:
            init = jax.jit(from_params, out_shardings=shardings)
            init_state = functools.partial(init, init_params)
        if make_steps is None:
            step = functools.partial(
                train_steps.lm_train_step,
                model=model,
                tx=tx,
                schedule=schedule,
                z_loss=train.z_loss,
                grad_accum_steps=optim.grad_accum_steps,
            )
            eval_step = functools.partial(train_steps.lm_eval_step, model=model)
        else:
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


def fixed_batches(iterator, n: int) -> list[dict]:
    return [next(iterator) for _ in range(n)]


def resolved_config_json(config: ml_collections.ConfigDict) -> str:
    return json.dumps(config.to_dict(), sort_keys=True, default=str)


def load_stage_params(
    config, workdir: str, stage: str, tokenizer, head: str = "lm", directory: str | None = None
):
    """(Model, params) of a stage's final checkpoint, sharded over this run's mesh.

    directory: an explicit checkpoint directory (another run's output); default
    `<workdir>/<stage>/checkpoints`.
    """
    from gptjax import checkpoint as ckpt_lib

    model = Model(model_config(config, tokenizer, head))
    mesh = make_mesh(config)
    shardings = sharding.param_shardings(mesh, model.logical_axes, model.abstract_params)
    directory = directory or os.path.join(stage_dir(workdir, stage), "checkpoints")
    if not os.path.isdir(directory):
        raise FileNotFoundError(
            f"no {stage} checkpoints at {directory}: run --stages={stage} first (same --workdir)"
        )
    abstract = ckpt_lib.abstract_tree(model.abstract_params, shardings)
    # load_params refuses a checkpoint trained with another tokenizer.
    params, _, _ = ckpt_lib.load_params(directory, abstract, tokenizer_hash=tokenizer.hash)
    return model, params


def run_lm_stage(stage: str, config, workdir: str, parts: dict):
    """Runs an LMTrainer stage (pretrain, SFT, RM) on the shared loop; returns (result,
    summary). Optional parts: "stage_dir" (default <workdir>/<stage>), "eval_fn" (default
    the held-out LM loss on parts["eval_batches"])."""
    from experiments.loop import run_stage

    trainer, tokenizer = parts["trainer"], parts["tokenizer"]
    result = run_stage(
        stage,
        parts.get("stage_dir") or stage_dir(workdir, stage),
        parts["loop"],
        init_state=trainer.init_state,
        state_shardings=trainer.shardings,
        train_step=trainer.step_fn(),
        batches=parts["batches"],
        rng=jax.random.key(config.seeds.init),
        eval_fn=parts.get("eval_fn") or trainer.eval_fn(parts["eval_batches"]),
        meta={
            "config": resolved_config_json(config),
            "tokenizer_hash": tokenizer.hash,
            "stage": stage,
        },
    )
    summary = {
        "stage": stage,
        "heldout_loss": result.eval_metrics.get("loss"),
        "heldout_accuracy": result.eval_metrics.get("accuracy"),
        "train_loss": result.last_metrics.get("loss"),
        "wall_s": result.wall_s,
        "steps_run": result.steps_run,
        "resumed_from": result.resumed_from,
    }
    return result, summary


def greedy_completions(
    model, params, tokenizer, prefixes: list[str], max_new_tokens: int, batch_size: int = 64
) -> list[str]:
    """Greedy raw-text continuations (cut at EOS), in fixed-size batches (one compile)."""
    import numpy as np

    from gptjax import sampling

    # A prompt that leaves no room for max_new_tokens keeps its end (what is completed).
    room = max(model.cfg.max_len - max_new_tokens, 1)
    prompts = [tokenizer.encode(p)[-room:] for p in prefixes]
    width = max(len(p) for p in prompts)
    max_new_tokens = min(max_new_tokens, model.cfg.max_len - width)
    out = []
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i : i + batch_size]
        tokens, mask = sampling.left_pad(chunk + [[tokenizer.eos_id]] * (batch_size - len(chunk)))
        tokens = np.pad(tokens, ((0, 0), (width - tokens.shape[1], 0)))
        mask = np.pad(mask, ((0, 0), (width - mask.shape[1], 0)))
        new, _, new_mask = sampling.generate(
            model,
            params,
            tokens,
            mask,
            np.zeros(batch_size, np.int32),
            max_new_tokens=max_new_tokens,
            eos_id=tokenizer.eos_id,
        )
        for row, m in zip(np.asarray(new)[: len(chunk)], np.asarray(new_mask)[: len(chunk)]):
            ids = row[m > 0].tolist()
            if tokenizer.eos_id in ids:
                ids = ids[: ids.index(tokenizer.eos_id)]
            out.append(tokenizer.decode(ids))
    return out
