"""The DPO stage section (dpo): `dpo_section()`, sized for the TPU presets;
configs/pipeline.py's runlocal block shrinks it for the CPU presets.

    python -m experiments.main --stages=dpo                       # after pretrain,sft,compare
    python -m experiments.main --stages=dpo --config.dpo.loss=ipo --config.dpo.beta=0.5

The objective's fields are gptjax/dpo.py DPOConfig's (beta, loss), the batch fields
gptjax/train_steps.py TrainConfig's (batch_size counts comparisons, each with its K
replies, as the RM's), the optimizer gptjax/optim.py OptimConfig's, the loop's
experiments/loop.py LoopConfig's; the stage's own are documented here. It runs
experiments/stages/dpo.py and writes `<workdir>/dpo`.
"""

import ml_collections

from experiments.loop import LoopConfig
from gptjax import config as config_lib
from gptjax.dpo import DPOConfig
from gptjax.optim import OptimConfig
from gptjax.train_steps import TrainConfig


def dpo_section() -> ml_collections.ConfigDict:
    loop = LoopConfig(steps=1, checkpoint_every=500, eval_every=500)
    c = config_lib.section(TrainConfig(), steps=2000, batch_size=64, seq_len=1024)
    c.update(config_lib.section(DPOConfig()))
    # Rafailov et al. 2023 (sec. 6): lr 1e-6 with 150 warmup steps, batch 64, β 0.1.
    c.optim = config_lib.section(OptimConfig(), lr=1e-6, warmup_steps=150, weight_decay=0.0)
    for name in ("checkpoint_every", "keep_checkpoints", "eval_every", "log_every", "nonfinite"):
        c[name] = getattr(loop, name)
    c.k_max = 0  # replies per batch element; 0 = the most any comparison has
    c.init_from = ""  # the SFT checkpoint dir (policy and reference); empty = this workdir's
    return c
