"""The one route from a stage's config section to the typed configs the library and the
loop read (gptjax/config.py from_dict), each validated once, with errors naming the field.
"""

from __future__ import annotations

from experiments.loop import LOOP_FIELDS, LoopConfig
from gptjax import config as config_lib
from gptjax.optim import OptimConfig
from gptjax.train_steps import TrainConfig
from gptjax.trainer import section_configs


def optim_config(section, prefix: str) -> OptimConfig:
    return config_lib.from_dict(OptimConfig, section.optim, f"{prefix}.optim")


def loop_config(section, prefix: str, steps: int, tokens_per_step: int = 0) -> LoopConfig:
    """The shared loop's settings of a stage section; `steps` is what the stage counts
    (PPO: iterations)."""
    fields = {name: section[name] for name in LOOP_FIELDS}
    return config_lib.from_dict(
        LoopConfig, {**fields, "steps": steps, "tokens_per_step": tokens_per_step}, prefix
    )


def train_config(section, prefix: str) -> tuple[TrainConfig, OptimConfig, LoopConfig]:
    """(batch fields, optimizer, loop) of a one-step-per-batch stage (pretrain, SFT, RM)."""
    train, optim = section_configs(section, prefix)
    return train, optim, loop_config(section, prefix, train.steps, train.batch_size * train.seq_len)
