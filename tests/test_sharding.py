"""Sharding: one rule table, sharded init, and sharded == single-device train step."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec
from jax.sharding import PartitionSpec as P

from gptjax import sharding, train_steps
from gptjax.errors import ConfigError
from gptjax.model import Model
from gptjax.sharding import MeshConfig
from tests.helpers import random_batch, tiny_model_config

CPU8 = MeshConfig(data=2, fsdp=2, tensor=2)


def _sgd_step(model, mesh):
    # SGD with lr 1: the param update is exactly -grad, so comparing updated params compares
    # gradients (Adam would amplify 1e-7 noise near zero gradients by lr/eps).
    tx = optax.sgd(1.0)
    init, shardings = train_steps.jit_init(model, tx, mesh)
    state = init(jax.random.key(0))
    step = functools.partial(train_steps.lm_train_step, model=model, tx=tx, schedule=lambda s: 1.0)
    return state, train_steps.jit_train_step(step, mesh, shardings)


def test_mesh_resolves_minus_one_and_rejects_bad_sizes():
    assert MeshConfig(data=2, fsdp=-1, tensor=2).shape(8) == (2, 2, 2)
    assert MeshConfig(data=1, fsdp=-1, tensor=1).shape(1) == (1, 1, 1)
    with pytest.raises(ConfigError, match="mesh"):
        MeshConfig(data=3, fsdp=1, tensor=1).shape(8)
    with pytest.raises(ConfigError, match="at most one"):
        MeshConfig(data=-1, fsdp=-1, tensor=1).shape(8)
    with pytest.raises(ConfigError, match="mesh.tensor"):
        MeshConfig(tensor=0).shape(8)


def test_unknown_logical_axis_is_an_error():
    with pytest.raises(KeyError, match="embedd"):
        sharding.logical_to_spec(("vocab", "embedd"))
    assert sharding.logical_to_spec(("vocab", "embed")) == PartitionSpec("tensor", "fsdp")


def test_every_model_weight_matches_a_rule():
    model = Model(tiny_model_config(positions="learned", tie_embeddings=False))
    specs = jax.tree.map(
        sharding.logical_to_spec, model.logical_axes, is_leaf=lambda x: isinstance(x, tuple)
    )
    assert jax.tree.structure(
        specs, is_leaf=lambda x: isinstance(x, PartitionSpec)
    ) == jax.tree.structure(model.abstract_params)


def test_indivisible_dim_names_the_param():
    mesh = sharding.make_mesh(CPU8)
    model = Model(tiny_model_config(vocab_size=63))
    with pytest.raises(ConfigError, match="embed"):
        sharding.param_shardings(mesh, model.logical_axes, model.abstract_params)


def test_sharded_init_shards_the_large_weights():
    assert jax.device_count() == 8, "conftest sets 8 simulated CPU devices"
    mesh = sharding.make_mesh(CPU8)
    model = Model(tiny_model_config(tie_embeddings=False))
    state, _ = _sgd_step(model, mesh)
    p = state["params"]
    # (vocab, embed) over (tensor, fsdp): each device holds a quarter of the table.
    assert p["embed"].sharding.shard_shape(p["embed"].shape) == (32, 16)
    assert p["blocks"]["wq"].sharding.spec == PartitionSpec(None, "fsdp", "tensor", None)
    assert p["blocks"]["w_down"].sharding.shard_shape(p["blocks"]["w_down"].shape) == (2, 32, 16)
    # Nothing with more than a vector's worth of bytes is left replicated.
    assert sharding.replicated_params(p, min_bytes=512) == []
    # Adam-like state mirrors the params' sharding.
    init, _ = train_steps.jit_init(model, optax.adam(1e-3), mesh)
    opt_state = init(jax.random.key(0))
    mu = opt_state["opt_state"][0].mu
    assert mu["embed"].sharding.spec == p["embed"].sharding.spec


@pytest.mark.parametrize(
    "overrides",
    [dict(), dict(positions="rope", norm="rmsnorm", mlp="swiglu", tie_embeddings=False)],
)
def test_lm_step_on_8_devices_equals_single_device(overrides):
    model = Model(tiny_model_config(**overrides))
    batch = random_batch(np.random.default_rng(0), 8, 16, 64)
    batch["segment_ids"][:, 10:] = 2  # two documents per row
    single = sharding.make_mesh(MeshConfig(fsdp=-1), devices=jax.devices()[:1])
    multi = sharding.make_mesh(CPU8)
    s1, step1 = _sgd_step(model, single)
    s8, step8 = _sgd_step(model, multi)
    p0 = jax.tree.map(np.asarray, s1["params"])
    jax.tree.map(np.testing.assert_array_equal, p0, jax.tree.map(np.asarray, s8["params"]))
    s1, m1 = step1(s1, batch, jax.random.key(1))
    s8, m8 = step8(s8, batch, jax.random.key(1))
    np.testing.assert_allclose(m1["loss"], m8["loss"], rtol=1e-6)
    np.testing.assert_allclose(m1["grad_norm"], m8["grad_norm"], rtol=1e-5)
    g1 = jax.tree.map(lambda new, old: old - np.asarray(new), s1["params"], p0)
    g8 = jax.tree.map(lambda new, old: old - np.asarray(new), s8["params"], p0)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), g1, g8)
    assert s8["params"]["blocks"]["w_up"].sharding.spec == PartitionSpec(None, "fsdp", "tensor")
    assert int(s8["step"]) == 1


def test_distributed_settings_come_from_config_then_environment():
    env = {
        "GPTJAX_COORDINATOR_ADDRESS": "10.0.0.1:1234",
        "GPTJAX_NUM_PROCESSES": "4",
        "GPTJAX_PROCESS_ID": "3",
    }
    assert sharding.distributed_kwargs(MeshConfig(), {}) is None  # single process
    # On a TPU pod JAX detects everything itself: initialize() with no arguments.
    assert sharding.distributed_kwargs(MeshConfig(multihost=True), {}) == {}
    # The environment alone turns multi-host on (a launcher sets one id per process).
    assert sharding.distributed_kwargs(MeshConfig(), env) == dict(
        coordinator_address="10.0.0.1:1234", num_processes=4, process_id=3
    )
    cfg = MeshConfig(multihost=True, coordinator_address="h:1", num_processes=2, process_id=0)
    assert sharding.distributed_kwargs(cfg, env) == dict(
        coordinator_address="h:1", num_processes=2, process_id=0
    )
    with pytest.raises(ConfigError, match="GPTJAX_PROCESS_ID"):
        sharding.distributed_kwargs(MeshConfig(), {**env, "GPTJAX_PROCESS_ID": "one"})
    with pytest.raises(ConfigError, match="mesh.process_id"):
        sharding.distributed_kwargs(MeshConfig(), {**env, "GPTJAX_PROCESS_ID": "4"})


def test_one_process_feeds_every_row():
    # Several hosts' blocks (shared by tensor-parallel peers, or refused when interleaved)
    # are checked on a TPU slice's devices in test_aot.py, and run in test_multihost.py.
    mesh = sharding.make_mesh(CPU8)
    assert sharding.host_block(mesh) == sharding.HostBlock(0, 1) == sharding.host_block()
    assert sharding.host_blocks(mesh) == {0: sharding.HostBlock(0, 1)}
    assert sharding.host_batch_slice(16, mesh) == slice(0, 16)


def _trunk(model):
    """The embedding and the blocks: the residual stream a block hands to the next."""
    from flax import nnx

    def hidden(params, tokens_BxT):
        b, t = tokens_BxT.shape
        net = nnx.merge(model.graphdef, params)
        positions = jnp.broadcast_to(jnp.arange(t), (b, t))
        mask = jnp.ones((b, t, t), bool)
        return net._blocks(net._embed(tokens_BxT, positions), mask, positions, None)

    return hidden


def test_activations_compile_to_the_shardings_their_logical_names_map_to():
    mesh = sharding.make_mesh(CPU8)
    model = Model(tiny_model_config(n_kv_heads=2))
    psh = sharding.param_shardings(mesh, model.logical_axes, model.abstract_params)
    params = jax.jit(model.init, out_shardings=psh)(jax.random.key(0))
    tokens = jax.device_put(np.ones((8, 16), np.int32), sharding.batch_sharding(mesh))

    def out_spec(fn):
        compiled = jax.jit(fn).lower(params, tokens).compile()
        assert compiled.input_shardings[0][0]["embed"].spec == P("tensor", "fsdp")
        return compiled.output_shardings.spec

    batch = ("data", "fsdp")
    # [batch, length, embed]: the batch over every data-parallel axis; fsdp, taken by the
    # batch, does not shard embed too.
    assert out_spec(sharding.with_mesh(_trunk(model), mesh)) == P(batch)
    assert out_spec(sharding.with_mesh(model.apply, mesh)) == P(batch, None, "tensor")
    # Unconstrained, propagation keeps whole microbatches on each fsdp shard instead.
    assert out_spec(_trunk(model)) != P(batch)


def test_a_large_parameter_left_replicated_is_a_named_error():
    mesh = sharding.make_mesh(CPU8)
    model = Model(tiny_model_config())
    loose = {**sharding.RULES, "vocab": None, "embed": None}  # nothing shards the embedding
    with pytest.raises(ConfigError, match=r"mesh: param \['embed'\] of shape \(64, 32\) .*"):
        sharding.param_shardings(mesh, model.logical_axes, model.abstract_params, loose, 1024)
    # The default rules shard it; pure data parallelism replicates every param by design.
    sharding.param_shardings(mesh, model.logical_axes, model.abstract_params, limit=1024)
    data = sharding.make_mesh(MeshConfig(data=8, fsdp=1))
    sharding.param_shardings(data, model.logical_axes, model.abstract_params, loose, 1024)


def test_the_trainer_refuses_a_replicated_parameter_at_init(monkeypatch):
    from gptjax.optim import OptimConfig
    from gptjax.train_steps import TrainConfig
    from gptjax.trainer import LMTrainer

    monkeypatch.setitem(sharding.RULES, "embed", None)
    monkeypatch.setitem(sharding.RULES, "vocab", None)
    monkeypatch.setattr(sharding, "REPLICATED_LIMIT_BYTES", 1024)
    with pytest.raises(ConfigError, match=r"param \['embed'\] of shape \(64, 32\)"):
        LMTrainer.build(
            tiny_model_config(), OptimConfig(), TrainConfig(), sharding.make_mesh(CPU8), seed=0
        )
