"""Ablation sweeps: variants x seeds, one preset per finding of DESIGN.md.

    python -m experiments.sweep --config=configs/sweep.py:kl             # over-optimisation
    python -m experiments.sweep --config=configs/sweep.py:ptx --workdir=runs/sweep-ptx
    python -m experiments.sweep --config=configs/sweep.py:kl --shared_from=runs/tiny-...

A sweep runs `shared_stages` once (seed 0, or reuses --shared_from, a finished pipeline
workdir) and then, for every variant and seed, the `cell_stages` in the cell's own
workdir, which links the shared stages' outputs. A cell's seed sets seeds.init,
seeds.data and seeds.sampling of its stages, so the interval across seeds measures the
variability of what the cell trains (not of the shared stages). Finished cells are not
rerun. Fields:

  pipeline       the configs/pipeline.py preset arg ("tiny")
  overrides      [dotted key, value] config overrides for every run of the sweep
  shared_stages  run once; cells link them
  cell_stages    run per (variant, seed)
  variants       name -> [dotted key, value] overrides of that variant
  seeds          the cells' seeds
  eval_variants  the eval stage's variants in each cell (gptjax names: SFT, PPO, ...)
  findings       the effects whose verdicts the report states: metric, protocol,
                 (variant a, model a), (variant b, model b), predicted sign of a − b
"""

import ml_collections

SHARED = ("pretrain", "sft", "compare", "rm")
# Sweeps evaluate on fewer prompts than the default run: many cells, same protocol.
SWEEP_OVERRIDES = {"eval.max_prompts": 256}


def _finding(name, metric, protocol, a, b, sign, why):
    return dict(name=name, metric=metric, protocol=protocol, a=a, b=b, sign=sign, why=why)


def _sweep(variants, cell_stages, eval_variants, findings, shared=SHARED, overrides=None):
    # Overrides are [dotted key, value] pairs (ConfigDict keys cannot contain dots).
    pairs = lambda d: [[k, v] for k, v in d.items()]  # noqa: E731
    return ml_collections.ConfigDict(
        dict(
            name="",
            pipeline="tiny",
            overrides=pairs({**SWEEP_OVERRIDES, **(overrides or {})}),
            shared_stages=list(shared),
            cell_stages=list(cell_stages),
            variants={name: pairs(v) for name, v in variants.items()},
            seeds=[0, 1, 2],
            eval_variants=list(eval_variants),
            findings=findings,
        )
    )


def _from_compare(variants, findings):
    """A sweep of a knob that acts from comparison collection on: pretrain and SFT are
    shared; compare, RM, PPO and eval run per cell."""
    return _sweep(
        variants,
        ["compare", "rm", "ppo", "eval"],
        ["SFT", "PPO"],
        findings,
        shared=("pretrain", "sft"),
    )


def get_config(name: str = "kl") -> ml_collections.ConfigDict:
    sweep = _preset(name)
    sweep.name = name
    return sweep


def _preset(name: str) -> ml_collections.ConfigDict:
    if name == "kl":
        # Over-optimisation (Gao et al. 2022): as the KL penalty weakens, the policy moves
        # further from SFT; the RM's reward keeps rising while gold reward peaks and falls.
        coefs = {"beta_1": 1.0, "beta_3e-1": 0.3, "beta_1e-1": 0.1, "beta_3e-2": 0.03}
        variants = {k: {"ppo.kl_coef": v} for k, v in coefs.items()}
        findings = [
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
        ]
        return _sweep(variants, ["ppo", "eval"], ["SFT", "PPO"], findings)
    if name == "ptx":
        # InstructGPT sec. 3.6 / fig. 34: mixing pretraining gradients into PPO reduces
        # the alignment tax (here: held-out pretraining loss) at little cost in reward.
        variants = {"ppo": {"ppo.ptx_coef": 0.0}, "ppo_ptx": {"ppo.ptx_coef": 1.0}}
        findings = [
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
        ]
        return _sweep(variants, ["ppo", "eval"], ["base zero-shot", "SFT", "PPO"], findings)
    if name == "best_of_n":
        variants = {f"n{n}": {"eval.best_of_n": n} for n in (2, 4, 8, 16)}
        findings = [
            _finding(
                "best-of-n improves with n",
                "gold_reward",
                "sample",
                ("n16", "best-of-16"),
                ("n2", "best-of-2"),
                +1,
                "more RM-ranked samples, better replies (until the RM is exploited)",
            )
        ]
        return _sweep(variants, ["eval"], ["SFT", "best-of-n"], findings)
    if name == "rm_data":
        variants = {f"prompts_{n}": {"compare.n_prompts": n} for n in (256, 512, 1536)}
        findings = [
            _finding(
                "more comparisons, better PPO",
                "gold_reward",
                "sample",
                ("prompts_1536", "PPO"),
                ("prompts_256", "PPO"),
                +1,
                "a larger RM dataset gives a better proxy and a better policy",
            )
        ]
        return _from_compare(variants, findings)
    if name == "label_noise":
        variants = {
            f"noise_{round(100 * n)}pct": {"world.label_noise": n} for n in (0.05, 0.25, 0.4)
        }
        findings = [
            _finding(
                "noisier labels, worse PPO",
                "gold_reward",
                "sample",
                ("noise_5pct", "PPO"),
                ("noise_40pct", "PPO"),
                +1,
                "label noise degrades the RM and what PPO learns from it",
            )
        ]
        return _from_compare(variants, findings)
    if name == "code_frac":
        variants = {
            f"code_{round(100 * f)}pct": {"world.code_doc_frac": f} for f in (0.0, 0.15, 0.4)
        }
        findings = [
            _finding(
                "code in pretraining helps computing",
                "accuracy_arithmetic",
                "greedy",
                ("code_40pct", "SFT"),
                ("code_0pct", "SFT"),
                +1,
                "code documents with computed results teach arithmetic and string skills",
            )
        ]
        return _sweep(variants, ["pretrain", "sft", "eval"], ["SFT"], findings, shared=())
    if name == "verbosity":
        variants = {"lw_0": {"world.length_weight": 0.0}, "lw_1e-1": {"world.length_weight": 0.1}}
        findings = [
            _finding(
                "a labeler that rewards detail makes RLHF verbose",
                "length_tokens",
                "sample",
                ("lw_1e-1", "PPO"),
                ("lw_0", "PPO"),
                +1,
                "the RM learns the length preference and PPO follows it",
            )
        ]
        return _from_compare(variants, findings)
    if name == "abstention":
        variants = {f"idk_{round(100 * r)}pct": {"world.demo_idk_rate": r} for r in (0.1, 0.5, 0.9)}
        findings = [
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
        ]
        return _sweep(
            variants,
            ["sft", "compare", "rm", "ppo", "eval"],
            ["SFT", "PPO"],
            findings,
            shared=("pretrain",),
        )
    raise ValueError(
        f"unknown sweep {name!r}; presets: kl, ptx, best_of_n, rm_data, label_noise, "
        "code_frac, verbosity, abstention"
    )
