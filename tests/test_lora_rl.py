"""LoRA in the online RL methods: the policy is the merged SFT model plus zero adapters,
its reference that merged model read back from the train state, so the base weights live
once in memory; only adapters (and the value model's) train."""

import gc

import jax
import numpy as np
import pytest

from configs import pipeline
from gptjax import grpo, lora, ppo, sharding
from gptjax.config import from_dict
from gptjax.model import Model, from_pipeline
from gptjax.optim import OptimConfig
from gptjax.rl_trainer import RLTrainer
from gptjax.rollout import rollout_config


def _config(stage):
    config = pipeline.get_config("tiny")
    config.model.update(lora_rank=4, d_model=32, n_layers=2, d_ff=64, vocab_size=128)
    config.tokenizer.vocab_size = 128
    s = config[stage]
    s.update(prompts_per_iteration=4, max_prompt_len=8, max_new_tokens=6, epochs=1,
             minibatches=1)  # fmt: skip
    s.optim.warmup_steps = 0
    return config


@pytest.mark.parametrize("stage", ["ppo", "grpo"])
def test_lora_policy_keeps_one_base_and_trains_adapters(stage):
    config = _config(stage)
    section = config[stage]
    shape = rollout_config(section, stage)
    optim = from_dict(OptimConfig, section.optim, f"{stage}.optim")
    policy, rm = Model(from_pipeline(config)), Model(from_pipeline(config, head="scalar"))
    sft = jax.jit(policy.init)(jax.random.key(0))  # an SFT model with its adapters
    sft["blocks"]["wq_lora_b"] = sft["blocks"]["wq_lora_b"] + 0.1
    rm_params = jax.jit(rm.init)(jax.random.key(1))
    rm_params["score_w"] = jax.random.normal(jax.random.key(3), rm_params["score_w"].shape)
    merged, _ = lora.merge(sft, policy.cfg)
    start = lora.add_adapters(merged, policy.cfg, jax.random.key(2))
    # Copies: a numpy view of a jax array on the CPU keeps its buffer from being donated.
    wq = np.array(start["blocks"]["wq"], copy=True)
    mesh = sharding.make_mesh(sharding.MeshConfig(), jax.devices()[:1])
    kw = dict(iterations=3, max_new_tokens=shape.max_new_tokens, eos_id=-1, sampling_seed=0)
    if stage == "ppo":
        cfg = ppo.from_section(section, stage)
        trainer = RLTrainer.ppo(policy, start, rm, rm_params, rm_params, cfg, optim, mesh, **kw)
    else:
        cfg = grpo.from_section(section, stage)
        trainer = RLTrainer.group(policy, start, rm, rm_params, cfg, optim, mesh, **kw)
    assert trainer.reference_from_state
    state = trainer.init_state()
    trainer.init_state.release()
    del sft, merged, start
    gc.collect()
    rng = np.random.default_rng(0)
    inputs = {"prompts": {"tokens": rng.integers(3, 128, (4, 8), dtype=np.int32),
                          "mask": np.ones((4, 8), np.int32)}}  # fmt: skip
    for i in range(2):
        state, metrics = trainer.iteration(state, inputs, jax.random.key(i))
        if i == 0:  # zero adapters on the merged model: the policy is its reference
            assert float(metrics["kl"]) == 0.0
    blocks = state["params"]["blocks"]
    np.testing.assert_array_equal(np.array(blocks["wq"], copy=True), wq)  # the base is frozen
    assert np.abs(np.array(blocks["wq_lora_b"], copy=True)).max() > 0  # the adapters trained
    # One copy of the policy's base weights among the live arrays: the state's, which the
    # reference reads too (none held apart, none left from the init).
    gc.collect()
    n_copies = sum(
        a.shape == wq.shape and not a.is_deleted() and np.array_equal(np.array(a, copy=True), wq)
        for a in jax.live_arrays()
    )
    assert n_copies == 1
