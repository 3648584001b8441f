"""Ablation sweeps: variants x seeds, one preset per finding of DESIGN.md.

    python -m experiments.sweep --config=configs/sweep.py:kl             # over-optimisation
    python -m experiments.sweep --config=configs/sweep.py:ptx --workdir=runs/sweep-ptx
    python -m experiments.sweep --config=configs/sweep.py:kl --shared_from=runs/tiny-...
    python -m experiments.sweep --config=configs/sweep.py:kl --config.seed_all=True
    python -m experiments.sweep --config=configs/sweep.py:algorithms   # PPO/GRPO/RLOO/DPO
    python -m experiments.sweep --config=configs/sweep.py:reasoning    # thinking and tools

Every cell (variant x seed) runs `stages` through the sweep's stage cache
(experiments/stage_cache.py): a stage whose settings and inputs are those of a stage
already run is shared, the rest run. The stages in `seeded` take the cell's seed
(seeds.init, seeds.data, seeds.sampling); the others keep the preset's seeds, so they are
shared by every cell they do not differ in. `seed_all` seeds every stage: the intervals
across seeds then describe the whole pipeline's variability, not only the seeded stages'.
Fields:

  pipeline       the configs/pipeline.py preset arg ("tiny")
  overrides      [dotted key, value] config overrides for every run of the sweep
  stages         the stages every cell runs (experiments/pipeline.py names)
  seeded         the stages that take the cell's seed
  seed_all       True: every stage takes the cell's seed
  variants       name -> [dotted key, value] overrides of that variant
  seeds          the cells' seeds
  eval_variants  the eval stage's variants in each cell (gptjax names: SFT, PPO, ...)
  findings       the effects whose verdicts the report states: metric, protocol,
                 (variant a, model a), (variant b, model b), predicted sign of a − b
  frontier       the algorithms preset's matched-KL analysis (experiments/frontier.py)
  per_variant    the report's per-variant tables: protocol -> metrics (default: the eval
                 stage's; the reasoning preset's: the reason stage's accuracies)
"""

import copy

import ml_collections

ALL = ("pretrain", "sft", "compare", "rm", "ppo", "eval")
# Sweeps evaluate on fewer prompts than the default run: many cells, same protocol.
SWEEP_OVERRIDES = {"eval.max_prompts": 256}


def _finding(name, metric, protocol, a, b, sign, why):
    return dict(name=name, metric=metric, protocol=protocol, a=a, b=b, sign=sign, why=why)


# name -> (variants {variant: {dotted key: value}}, stages, seeded stages, eval variants,
# findings)
PRESETS = {
    # Over-optimisation (Gao et al. 2022): as the KL penalty weakens, the policy moves
    # further from SFT; the RM's reward keeps rising while gold reward peaks and falls.
    "kl": (
        {
            name: {"ppo.kl_coef": beta}
            for name, beta in (
                ("beta_1", 1.0),
                ("beta_3e-1", 0.3),
                ("beta_1e-1", 0.1),
                ("beta_3e-2", 0.03),
            )
        },
        ALL,
        ("ppo", "eval"),
        ("SFT", "PPO"),
        [
            _finding(
                "RLHF beats SFT on gold reward",
                "gold_reward",
                "sample",
                ("beta_3e-1", "PPO"),
                ("beta_3e-1", "SFT"),
                +1,
                "PPO at the default KL penalty improves on SFT",
            ),
            _finding(
                "over-optimisation lowers gold reward",
                "gold_reward",
                "sample",
                ("beta_3e-2", "PPO"),
                ("beta_3e-1", "PPO"),
                -1,
                "with almost no KL penalty the policy exploits the proxy RM",
            ),
            _finding(
                "the proxy RM keeps rising",
                "rm_reward",
                "sample",
                ("beta_3e-2", "PPO"),
                ("beta_3e-1", "PPO"),
                +1,
                "the RM's own score grows with KL even when gold falls",
            ),
            _finding(
                "RLHF lowers diversity",
                "distinct_2",
                "sample",
                ("beta_3e-1", "PPO"),
                ("beta_3e-1", "SFT"),
                -1,
                "PPO sharpens the policy: fewer distinct bigrams among samples",
            ),
            _finding(
                "RLHF raises abstention on unknowns",
                "abstention_unknown",
                "sample",
                ("beta_3e-1", "PPO"),
                ("beta_3e-1", "SFT"),
                +1,
                "the labeler prefers 'i don't know' on unknown people; demos under-use it",
            ),
        ],
    ),
    # InstructGPT sec. 3.6 / fig. 34: mixing pretraining gradients into PPO reduces the
    # alignment tax (here: held-out pretraining loss) at little cost in reward.
    "ptx": (
        {"ppo": {"ppo.ptx_coef": 0.0}, "ppo_ptx": {"ppo.ptx_coef": 1.0}},
        ALL,
        ("ppo", "eval"),
        ("base zero-shot", "SFT", "PPO"),
        [
            _finding(
                "RLHF pays an alignment tax",
                "heldout_lm_loss",
                "model",
                ("ppo", "PPO"),
                ("ppo", "base zero-shot"),
                +1,
                "RLHF raises the held-out pretraining loss over the base model's",
            ),
            _finding(
                "ptx reduces the alignment tax",
                "heldout_lm_loss",
                "model",
                ("ppo_ptx", "PPO"),
                ("ppo", "PPO"),
                -1,
                "PPO-ptx keeps the pretraining loss lower than plain PPO",
            ),
            _finding(
                "ptx keeps the gold reward",
                "gold_reward",
                "sample",
                ("ppo_ptx", "PPO"),
                ("ppo_ptx", "SFT"),
                +1,
                "PPO-ptx still beats SFT",
            ),
        ],
    ),
    "best_of_n": (
        {f"n{n}": {"eval.best_of_n": n} for n in (2, 4, 8, 16)},
        ("pretrain", "sft", "compare", "rm", "eval"),
        # The RM varies with the seed (its comparisons and its init); the evaluator's
        # sampling is a fixed protocol (eval.seed), so seeding eval alone changes nothing.
        ("compare", "rm", "eval"),
        ("SFT", "best-of-n"),
        [
            _finding(
                "best-of-n improves with n",
                "gold_reward",
                "sample",
                ("n16", "best-of-16"),
                ("n2", "best-of-2"),
                +1,
                "more RM-ranked samples, better replies (until the RM is exploited)",
            )
        ],
    ),
    # Knobs that act from comparison collection on: pretrain and SFT are shared.
    "rm_data": (
        {f"prompts_{n}": {"compare.n_prompts": n} for n in (256, 512, 1536)},
        ALL,
        ("compare", "rm", "ppo", "eval"),
        ("SFT", "PPO"),
        [
            _finding(
                "more comparisons, better PPO",
                "gold_reward",
                "sample",
                ("prompts_1536", "PPO"),
                ("prompts_256", "PPO"),
                +1,
                "a larger RM dataset gives a better proxy and a better policy",
            )
        ],
    ),
    # Gao et al. (2022)'s over-optimisation study (experiments/overopt.py): RMs trained on
    # three amounts of comparisons, each optimised by best-of-n (n up to 64) and by a long
    # low-β PPO run evaluated during training. Pretrain and SFT are shared by every cell.
    "overopt": (
        {f"rm_{n}": {"compare.n_prompts": n} for n in (256, 512, 1536)},
        ALL,
        ("compare", "rm", "ppo"),
        ("SFT", "best-of-n", "PPO"),
        [
            _finding(
                "a larger RM holds up better under best-of-64",
                "gold_reward",
                "sample",
                ("rm_1536", "best-of-64"),
                ("rm_256", "best-of-64"),
                +1,
                "a proxy fitted to more comparisons is exploited less at the same n",
            )
        ],
    ),
    "label_noise": (
        {f"noise_{round(100 * n)}pct": {"world.label_noise": n} for n in (0.05, 0.25, 0.4)},
        ALL,
        ("compare", "rm", "ppo", "eval"),
        ("SFT", "PPO"),
        [
            _finding(
                "noisier labels, worse PPO",
                "gold_reward",
                "sample",
                ("noise_5pct", "PPO"),
                ("noise_40pct", "PPO"),
                +1,
                "label noise degrades the RM and what PPO learns from it",
            )
        ],
    ),
    "code_frac": (
        {f"code_{round(100 * f)}pct": {"world.code_doc_frac": f} for f in (0.0, 0.15, 0.4)},
        ("pretrain", "sft", "eval"),
        ("pretrain", "sft", "eval"),
        ("SFT",),
        [
            _finding(
                "code in pretraining helps computing",
                "accuracy_arithmetic",
                "greedy",
                ("code_40pct", "SFT"),
                ("code_0pct", "SFT"),
                +1,
                "code documents with computed results teach arithmetic and string skills",
            )
        ],
    ),
    "verbosity": (
        {"lw_0": {"world.length_weight": 0.0}, "lw_1e-1": {"world.length_weight": 0.1}},
        ALL,
        ("compare", "rm", "ppo", "eval"),
        ("SFT", "PPO"),
        [
            _finding(
                "a labeler that rewards detail makes RLHF verbose",
                "length_tokens",
                "sample",
                ("lw_1e-1", "PPO"),
                ("lw_0", "PPO"),
                +1,
                "the RM learns the length preference and PPO follows it",
            )
        ],
    ),
    "abstention": (
        {f"idk_{round(100 * r)}pct": {"world.demo_idk_rate": r} for r in (0.1, 0.5, 0.9)},
        ALL,
        ("sft", "compare", "rm", "ppo", "eval"),
        ("SFT", "PPO"),
        [
            _finding(
                "demos that abstain more make SFT abstain more",
                "abstention_unknown",
                "sample",
                ("idk_90pct", "SFT"),
                ("idk_10pct", "SFT"),
                +1,
                "SFT imitates the demonstrator's rate of 'i don't know'",
            ),
            _finding(
                "RLHF raises abstention from a low-abstention SFT",
                "abstention_unknown",
                "sample",
                ("idk_10pct", "PPO"),
                ("idk_10pct", "SFT"),
                +1,
                "the labeler prefers abstaining on unknown people",
            ),
        ],
    ),
}


# The alignment lab (README "Algorithms"): every method at three values of its KL knob β
# (PPO, GRPO, RLOO: the penalty's coefficient; DPO: its β), the online methods once more
# on the gold reward, whole-pipeline seeds. The references (SFT at lower temperatures,
# best-of-n for several n) are evaluated in the middle variant only: they do not depend
# on β. The frontier analysis: experiments/frontier.py.
BETAS = (("beta_1", 1.0), ("beta_3e-1", 0.3), ("beta_1e-1", 0.1))
METHODS = ("PPO", "GRPO", "RLOO", "DPO")
GOLD_METHODS = ("PPO (gold reward)", "GRPO (gold reward)", "RLOO (gold reward)")
PRESETS["algorithms"] = (
    {
        name: {
            "ppo.kl_coef": beta,
            "grpo.kl_coef": beta,
            "rloo.kl_coef": beta,
            "dpo.beta": beta,
            "eval.best_of_n": 0,
            **(
                {"eval.sft_temperatures": (0.4, 0.6, 0.8), "eval.best_of_curve": (2, 4, 8, 16)}
                if name == "beta_3e-1"
                else {}
            ),
        }
        for name, beta in BETAS
    },
    (*ALL[:-1], "grpo", "rloo", "dpo", "ppo_gold", "grpo_gold", "rloo_gold", "eval"),
    (),  # seed_all: every stage
    ("SFT", "SFT T", "best-of-n", *METHODS, *GOLD_METHODS),
    [
        _finding(
            f"{method} beats SFT on gold",
            "gold_reward",
            "sample",
            ("beta_3e-1", method),
            ("beta_3e-1", "SFT"),
            +1,
            f"{method} at β = 0.3 (the CPU presets' default) improves on SFT",
        )
        for method in METHODS
    ],
)
# The gates of the default run (experiments/gates.py) over 5 whole-pipeline seeds: the
# default run itself per seed (its stages, its eval size, every variant), each gate's
# spread against its floor (the report's "Gates over seeds").
PRESETS["gates"] = ({"default": {}}, (*ALL[:-1], "ppo_ptx", "eval"), (), (), [])
# Is the RM's reference feature (rm.ref_logprob: w · mean log π_SFT(reply)) what makes
# PPO work here? With it PPO's optimum is partly SFT at a lower temperature. PPO with
# and without it, each against SFT over temperature and best-of-n (picked by the same
# variant's RM) at PPO's own KL, over 5 whole-pipeline seeds.
_REFERENCES = {"eval.sft_temperatures": (0.4, 0.6, 0.8), "eval.best_of_curve": (2, 4, 8)}
PRESETS["ref_feature"] = (
    {
        "with_feature": {"rm.ref_logprob": True, **_REFERENCES},
        "without_feature": {"rm.ref_logprob": False, **_REFERENCES},
    },
    ALL,
    (),
    ("SFT", "SFT T", "best-of-n", "PPO"),
    [
        _finding(
            "PPO gains more gold with the reference feature",
            "gold_reward",
            "sample",
            ("with_feature", "PPO"),
            ("without_feature", "PPO"),
            +1,
            "the feature gives the RM the SFT model's knowledge of facts",
        ),
        _finding(
            "the RM feature's PPO beats SFT on gold",
            "gold_reward",
            "sample",
            ("with_feature", "PPO"),
            ("with_feature", "SFT"),
            +1,
            "RLHF with the default RM",
        ),
        _finding(
            "PPO without the feature beats SFT on gold",
            "gold_reward",
            "sample",
            ("without_feature", "PPO"),
            ("without_feature", "SFT"),
            +1,
            "RLHF with the InstructGPT RM (head only)",
        ),
    ],
)
# Thinking and tools (configs/pipeline.py:tiny,reasoning=1): the reason stage's modes
# per model, as "SFT (cot)", "GRPO (gold reward) (tools)"; code documents in pretraining
# on / off, chain-of-thought demos on / off. Every cell is a whole pipeline at its seed
# (3 variants x 3 seeds: about 2 hours on 2 CPU cores).
_REASON_STAGES = ("pretrain", "sft", "grpo_gold", "reason")
PRESETS["reasoning"] = (
    {
        "code_15": {},
        "code_0": {"world.code_doc_frac": 0.0},
        # No chain-of-thought demos: their share goes to direct answers.
        "cot_0": {"world.cot_demo_frac": 0.0},
    },
    _REASON_STAGES,
    (),
    (),
    [
        _finding(
            "chain of thought beats direct answers on multi-step tasks",
            "accuracy_multistep",
            "greedy",
            ("code_15", "SFT (cot)"),
            ("code_15", "SFT (direct)"),
            +1,
            "the steps give a small model the intermediate results (Wei et al. 2022)",
        ),
        _finding(
            "self-consistency beats a single chain",
            "accuracy_multistep",
            "sample",
            ("code_15", "SFT (sc)"),
            ("code_15", "SFT (cot)"),
            +1,
            "a majority vote over sampled chains (Wang et al. 2023) vs one sampled chain",
        ),
        _finding(
            "tools raise arithmetic accuracy",
            "accuracy_arithmetic",
            "greedy",
            ("code_15", "SFT (tools)"),
            ("code_15", "SFT (direct)"),
            +1,
            "the calculator computes what the model cannot (Toolformer)",
        ),
        _finding(
            "RL with tools raises multi-step accuracy over tool-SFT",
            "accuracy_multistep",
            "greedy",
            ("code_15", "GRPO (gold reward) (tools)"),
            ("code_15", "SFT (tools)"),
            +1,
            "GRPO on tool-using rollouts, rewarded for the final answer",
        ),
        _finding(
            "code in pretraining raises chain-of-thought accuracy",
            "accuracy_multistep",
            "greedy",
            ("code_15", "SFT (cot)"),
            ("code_0", "SFT (cot)"),
            +1,
            "the published claim that code data helps multi-step reasoning",
        ),
        _finding(
            "chain-of-thought demos raise chain-of-thought accuracy",
            "accuracy_multistep",
            "greedy",
            ("code_15", "SFT (cot)"),
            ("cot_0", "SFT (cot)"),
            +1,
            "a third of the reasoning demos written step by step vs none",
        ),
    ],
)
_REASON_METRICS = (
    "accuracy_arithmetic",
    "accuracy_chain",
    "accuracy_letters",
    "accuracy_fact",
    "abstention_unknown",
    "tools_call_rate",
)
EXTRA = {
    "reasoning": dict(
        pipeline="tiny,reasoning=1",
        seed_all=True,
        per_variant={"greedy": _REASON_METRICS, "sample": _REASON_METRICS},
    ),
    "gates": dict(seed_all=True, seeds=[0, 1, 2, 3, 4], overrides=[]),
    "overopt": dict(
        seeds=[0, 1],
        # The same 128 eval prompts for the evaluator and PPO's in-stage evaluations, so
        # SFT's point (d = 0) and the RL curve share prompts; best-of-64 draws 64 x 4
        # SFT samples a prompt, the pool of its exact KL. β 0.01 (default 0.3) for 40
        # iterations (default 20), evaluated every 2: a run long and loose enough to
        # over-optimise (at β 0.01 the KL passes 5 nats by iteration 8).
        overrides=[
            ["eval.max_prompts", 128],
            ["eval.best_of_curve", (2, 4, 8, 16, 32, 64)],
            ["ppo.kl_coef", 0.01],
            ["ppo.iterations", 40],
            ["ppo.eval_every", 2],
            ["ppo.eval_prompts", 128],
        ],
        overopt=dict(rl_stages=["ppo"]),
    ),
    "ref_feature": dict(
        seed_all=True,
        curves_across_variants=False,  # two RMs, not a knob: a curve per variant
        seeds=[0, 1, 2, 3, 4],
        frontier=dict(
            methods=["PPO"],
            gold_methods=[],
            matched_kl=[],
            own_kl=[["with_feature", "PPO"], ["without_feature", "PPO"]],
        ),
    ),
    "algorithms": dict(
        seed_all=True,
        seeds=[0, 1, 2, 3, 4],  # the findings protocol's 5: 3 left most intervals wide
        # The analysis of experiments/frontier.py: RM-trained methods, gold-trained ones,
        # and the KLs (nats per reply) at which the methods' curves are compared.
        frontier=dict(
            methods=list(METHODS), gold_methods=list(GOLD_METHODS), matched_kl=[0.4, 0.8]
        ),
    ),
}


def get_config(name: str = "kl") -> ml_collections.ConfigDict:
    if name not in PRESETS:
        raise ValueError(f"unknown sweep {name!r}; presets: {', '.join(PRESETS)}")
    # A copy: a caller may change its config, never the presets.
    variants, stages, seeded, eval_variants, findings = copy.deepcopy(PRESETS[name])
    # Overrides are [dotted key, value] pairs (ConfigDict keys cannot contain dots).
    pairs = lambda d: [[k, v] for k, v in d.items()]  # noqa: E731
    fields = dict(
        name=name,
        pipeline="tiny",
        overrides=pairs(SWEEP_OVERRIDES),
        stages=list(stages),
        seeded=list(seeded),
        seed_all=False,
        variants={v: pairs(o) for v, o in variants.items()},
        seeds=[0, 1, 2],
        eval_variants=list(eval_variants),
        findings=findings,
        frontier=None,  # the algorithms analysis (experiments/frontier.py)
        # The reward-vs-KL plot joins a method's points across variants (a knob of it).
        curves_across_variants=True,
    )
    fields.update(EXTRA.get(name, {}))
    return ml_collections.ConfigDict(fields)
