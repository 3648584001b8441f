"""The PPO stage sections (ppo, ppo_ptx, ppo_gold): `ppo_section(ptx)`, sized for the TPU presets;
configs/pipeline.py's runlocal block shrinks them for the CPU presets.

    python -m experiments.main --stages=ppo                       # after pretrain,sft,...,rm
    python -m experiments.main --stages=ppo_ptx --config.ppo_ptx.ptx_coef=2.0
    python -m experiments.main --stages=ppo --config.ppo.kl_target=2.0 --config.ppo.value_from=head

The algorithm's fields are gptjax/ppo.py PPOConfig's, the batch shapes gptjax/rollout.py
RolloutConfig's, the loop's experiments/loop.py LoopConfig's (each documented there);
the rest are the stage's own, documented here (`rl_section`, shared with GRPO and RLOO:
configs/grpo.py). Every instance runs experiments/stages/rl.py and writes
`<workdir>/<instance>`.
"""

import ml_collections

from experiments.loop import LoopConfig
from gptjax import config as config_lib
from gptjax import rewards
from gptjax.optim import OptimConfig
from gptjax.ppo import PPOConfig
from gptjax.rollout import RolloutConfig


def ppo_section(ptx: bool, reward: str = rewards.RM) -> ml_collections.ConfigDict:
    algo = config_lib.section(
        PPOConfig(),
        # lm-human-preferences subtracts a constant from replies that never end.
        no_eos_penalty=1.0,
        ptx_coef=1.0 if ptx else 0.0,
    )
    c = rl_section(algo, "ppo", reward)
    # What a discarded KL blow-up (kl_max) does: "rollback" (go on from the state before
    # it, counted as kl_blowup) | "stop" (end the stage there).
    c.kl_guard = "rollback"
    return c


def rl_section(algo, algorithm: str, reward: str) -> ml_collections.ConfigDict:
    """An online RL stage's section: the algorithm's fields, the rollout shapes, the loop's
    and the stage's own (documented here)."""
    loop = LoopConfig(steps=1)
    c = ml_collections.ConfigDict(
        {
            # ppo | grpo | rloo: which update (gptjax/ppo_step.py, gptjax/grpo.py).
            "algorithm": algorithm,
            **algo,
            # Where the reward comes from: "rm" (the RM stage's model) | "gold" (the world's
            # noiseless labeler, a verifiable reward) | "module:function" (a user's function
            # of the prompt records and reply texts, gptjax/rewards.py).
            "reward": reward,
            **config_lib.section(RolloutConfig()),
            "iterations": 200,  # RL iterations (rollout + scoring + update): the stage's steps
            # "world" (the world's ppo_prompts) | demos:PATH (the prompt turns of a
            # demonstrations file, any format README lists) | reason:MODE (the world's
            # reason_ppo tasks asked in MODE: direct, cot or tools; world.n_reason_prompts).
            "prompts": "world",
            # Rollouts call the run's tools (tools.names) and get their results fed back:
            # multi-turn RL, the results masked out of the policy loss and the KL.
            "tools": False,
            # AdamW for policy and value, each with its own state and clipping; the
            # schedule runs over iterations x epochs x minibatches updates. lm-human-
            # preferences decays the lr linearly to 0 and uses no weight decay.
            "optim": config_lib.section(
                OptimConfig(),
                lr=1e-5,
                warmup_steps=0,
                schedule="linear",
                min_lr_ratio=0.0,
                weight_decay=0.0,
            ),
            # Checkpoint dirs of the SFT policy / the RM (read when reward=rm); empty =
            # this workdir's.
            "policy_from": "",
            "rm_from": "",
            # How many of the world's eval prompts the in-stage gold evaluation (every
            # eval_every iterations) uses; 0 = none. The eval stage uses all of them.
            "eval_prompts": 512,
            "checkpoint_every": 50,
            "keep_checkpoints": loop.keep_checkpoints,
            "eval_every": 20,
            "log_every": 1,
            "nonfinite": loop.nonfinite,
        }
    )
    return c
