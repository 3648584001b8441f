"""The critic-free RL stage sections (grpo, rloo, grpo_gold, rloo_gold): `group_section`,
sized for the TPU presets; configs/pipeline.py's runlocal block shrinks them for the CPU
presets.

    python -m experiments.main --stages=grpo                      # after pretrain,sft,...,rm
    python -m experiments.main --stages=rloo --config.rloo.kl_coef=0.1
    python -m experiments.main --stages=grpo_gold                  # the gold labeler's reward
    python -m experiments.main --stages=grpo --config.grpo.reward=my_rewards:length_bonus

The algorithm's fields are gptjax/grpo.py GroupConfig's, the batch shapes
gptjax/rollout.py RolloutConfig's (prompts_per_iteration counts prompts: a rollout has
prompts x group_size rows), the loop's and the stage's own fields configs/ppo.py's. Every
instance runs experiments/stages/rl.py.
"""

import ml_collections

from configs.ppo import rl_section
from gptjax import config as config_lib
from gptjax import rewards
from gptjax.grpo import GroupConfig


def group_section(algorithm: str, reward: str = rewards.RM) -> ml_collections.ConfigDict:
    algo = config_lib.section(
        GroupConfig(algorithm=algorithm, kl_in="reward" if algorithm == "rloo" else "loss"),
        no_eos_penalty=1.0,  # as PPO's sections
    )
    return rl_section(algo, algorithm, reward)
