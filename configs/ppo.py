"""The PPO and PPO-ptx stage sections: `ppo_section(preset, ptx)`.

    python -m experiments.main --stages=ppo                       # after pretrain,sft,...,rm
    python -m experiments.main --stages=ppo_ptx --config.ppo_ptx.ptx_coef=2.0
    python -m experiments.main --stages=ppo --config.ppo.kl_target=2.0 --config.ppo.value_from=head

configs/pipeline.py sets `c.ppo = ppo_section(name, ptx=False)` and
`c.ppo_ptx = ppo_section(name, ptx=True)`; the two stages run the same code
(experiments/ppo.py) and write `<workdir>/ppo` and `<workdir>/ppo_ptx`.

Fields:
  iterations            PPO iterations (rollout + scoring + update); the stage's "steps"
  prompts_per_iteration rollouts per iteration (B); a multiple of minibatches x data-parallel
  prompts               "world" (the world's ppo_prompts) | demos:PATH (the prompt turns of
                        a demonstrations file, any format README lists)
  max_prompt_len        prompts are left-padded to this; longer ones lose their start
  max_new_tokens        reply length limit; max_prompt_len + max_new_tokens <= model.max_len
  temperature           rollout sampling temperature; log-probs use the same (lm-human-prefs)
  epochs, minibatches   PPO epochs over each rollout batch, minibatches (updates) per epoch
  optim                 AdamW for policy and value (gptjax/optim.py); each has its own state
                        and gradient clipping; the schedule runs over iterations*epochs*minibatches
  clip_ratio            PPO's ε for the probability ratio
  clip_value            ε_v for the clipped value loss, in reward units
  gamma, lam            GAE discount and λ (per token; γ = 1: the reply is one episode)
  vf_coef, ent_coef     value-loss weight and entropy bonus in the summed loss
  kl_coef               β, the per-token KL penalty (the initial value when adaptive)
  kl_target             0: fixed β; > 0: lm-human-preferences' proportional controller moves β
                        toward this KL per reply (nats), at rate batch / kl_horizon
  kl_horizon            the controller's horizon in rollouts
  kl_max                KL blow-up guard: an update after which the policy's KL to the SFT
                        model on the rollout exceeds this (nats per reply) is discarded; 0 = off
  kl_guard              what a discarded blow-up does: "rollback" (go on from the state before
                        it, counted as kl_blowup in metrics) | "stop" (end the stage there)
  whiten_rewards        whiten per-token rewards (without shifting their mean) before GAE
  no_eos_penalty        subtracted from the RM score of replies cut at max_new_tokens
  ptx_coef              γ_ptx: weight of the pretraining LM loss mixed into every update
                        (InstructGPT's PPO-ptx; 0 = plain PPO)
  ptx_batch_size        pretraining rows per iteration, split over the minibatches
  ptx_seq_len           their length
  value_from            "rm": a separate value model initialised from the RM (InstructGPT);
                        "head": a scalar head on the policy's trunk, initialised to zero
  policy_from, rm_from  checkpoint dirs of the SFT policy / the RM; empty = this workdir's
  eval_every            gold evaluation every this many iterations (0 = only at the end)
  eval_prompts          how many of the world's eval prompts the in-stage evaluation uses
                        (0 = none); the eval stage evaluates on all of them
  checkpoint_every, keep_checkpoints, log_every, nonfinite   as in every stage; nonfinite
                        also covers non-finite rollout log-probs, values and scores (the
                        whole iteration's update is discarded)
"""

import ml_collections

# As configs/pipeline.py's CPU_PRESETS (not imported: pipeline.py imports this file).
CPU_PRESETS = ("tiny", "small_cpu", "gpt2_4l")


def ppo_section(preset: str, ptx: bool) -> ml_collections.ConfigDict:
    from gptjax.optim import OptimConfig

    cpu = preset in CPU_PRESETS
    optim = {
        **OptimConfig().__dict__,
        "lr": 1e-4 if cpu else 1e-5,
        "warmup_steps": 0,
        # lm-human-preferences decays the lr linearly to 0 over training.
        "schedule": "linear",
        "min_lr_ratio": 0.0,
        "weight_decay": 0.0,
    }
    c = ml_collections.ConfigDict(
        dict(
            iterations=20 if cpu else 200,
            prompts_per_iteration=64 if cpu else 512,
            prompts="world",
            max_prompt_len=20 if cpu else 128,
            max_new_tokens=16 if cpu else 64,
            temperature=1.0,
            epochs=4,
            # 2 x 32 rows on a CPU: small minibatches cost more per token there.
            minibatches=2 if cpu else 4,
            optim=optim,
            clip_ratio=0.2,
            clip_value=0.2,
            gamma=1.0,
            lam=0.95,
            vf_coef=0.1,
            ent_coef=0.0,
            # tiny, world v4, 20 iterations, 3 seeds, 256 eval prompts (runs/sweep-kl4;
            # KL nats/reply at T=1; PPO − SFT gold greedy / T=1; greedy accuracy, 95%
            # intervals over seeds): β 1: 0.17, +0.031 [−0.046, 0.109] / +0.022 [−0.034,
            # 0.078], −0.007 [−0.014, −0.001]; β 0.3: 0.40, +0.070 [0.038, 0.102] / +0.089
            # [0.064, 0.115], −0.016 [−0.033, 0.001]; β 0.1: 3.0, +0.070 / +0.174, −0.296;
            # β 0.03: 7.2, +0.192 / +0.271, −0.436 (every reply "i don't know": the gold
            # labeler scores that 0.2 on answerable prompts, above this model's answers on
            # average). The RM prices "i don't know" above some right answers (probe:
            # true>idk 0.21 on known people), so the further PPO goes, the more it also
            # abstains where it knows; the accuracy gate is what catches it.
            kl_coef=0.3 if cpu else 0.02,
            kl_target=0.0,
            kl_horizon=10_000.0,
            # Off by default: checking costs one more policy forward pass per iteration.
            kl_max=0.0,
            kl_guard="rollback",
            whiten_rewards=False,
            no_eos_penalty=1.0,
            ptx_coef=1.0 if ptx else 0.0,
            ptx_batch_size=16 if cpu else 256,
            ptx_seq_len=64 if cpu else 1024,
            value_from="rm",
            policy_from="",
            rm_from="",
            eval_every=10 if cpu else 20,
            eval_prompts=128 if cpu else 512,
            checkpoint_every=10 if cpu else 50,
            keep_checkpoints=3,
            log_every=1,
            nonfinite="skip",
        )
    )
    return c
