"""The built-in assistant world: a generated corpus, tasks and an exact gold labeler.

    from gptjax import world
    cfg = world.WorldConfig(seed=0)            # every knob and split size (config.py)
    data = world.generate(cfg)                 # {split: [JSON-able record, ...]}
    world.gold_score(task, response, ended)    # exact reward (labeler.py)
    world.noisy_ranking(task, responses, endeds, np_rng, cfg.label_temperature)

Modules: config (WorldConfig), vocab (every word), tasks (task records, response
styles), documents (pretraining documents, few-shot prompts), generate (splits),
labeler (score table, categories, Bradley-Terry comparisons).
"""

from gptjax.world.config import WorldConfig
from gptjax.world.documents import fewshot_prompt, parse_fewshot_completion, probe_hit
from gptjax.world.generate import generate
from gptjax.world.labeler import (
    classify,
    gold_score,
    noiseless_ranking,
    noisy_ranking,
    pairwise_disagreement,
    ranking_from_scores,
    temperature_for_noise,
)
from gptjax.world.tasks import task_key

__all__ = [
    "WorldConfig",
    "classify",
    "fewshot_prompt",
    "generate",
    "gold_score",
    "noiseless_ranking",
    "noisy_ranking",
    "pairwise_disagreement",
    "parse_fewshot_completion",
    "probe_hit",
    "ranking_from_scores",
    "task_key",
    "temperature_for_noise",
]
