"""The pipeline config: every stage's settings, as named presets.

    python -m experiments.main            # = --config=configs/pipeline.py:tiny
    python -m experiments.main --config=configs/pipeline.py:tiny --workdir=runs/tiny \
        --config.pretrain.steps=200
    python -m experiments.main --config=configs/pipeline.py:small_cpu
    python -m experiments.main --config=configs/pipeline.py:gpt2_124m,mesh=tpu_vm \
        --config.data.pretrain=tfds:lm1b                          # on a TPU VM

Presets: tiny (CPU, minutes), small_cpu (CPU, ~12M params), gpt2_124m, gpt2_350m,
gpt2_1.5b, llama_1b, llama_7b, gpt3_175b (TPU; each with a target slice and the settings
that fit it, configs/model.py TARGETS/FITS). The arg is `MODEL[,mesh=MESH]` as in
configs/model.py.

Sections:
  seeds      separate seeds for the world, init, data order and sampling, so one can be
             varied while the others stay fixed (e.g. init seeds over fixed data)
  world      knobs and sizes of the built-in assistant world (gptjax/world/config.py)
  data       where each stage's data comes from: "world" or KIND:PATH (README: Using
             your own data); data_dir holds prepared TFDS datasets (default workdir/data)
  tokenizer  sentencepiece training settings; path empty = <workdir>/tokenizer/spm.model
  model      architecture (configs/model.py); vocab_size 0 = the tokenizer's, padded
  mesh       device mesh (gptjax/sharding.py)
  pretrain   steps, batch, optimizer, checkpointing and eval of next-token pretraining
  sft        the same for supervised fine-tuning on demonstrations (loss on replies only),
             starting from the pretrain stage's final params (or sft.init_from)
  eval       the evaluator's fixed protocol (gptjax/evaluate.py)
  compare    comparison collection: K replies per prompt sampled from SFT, ranked by a
             labeler, written to <workdir>/compare/ (experiments/compare.py)
  ppo, ppo_ptx  RLHF with clipped PPO against the RM, without and with the pretraining
             loss mixed in (configs/ppo.py documents the fields)
  rm         the reward model: the K-way ranking loss from the SFT params with a scalar
             head; batch_size counts prompts (each with its K replies); eval_batches =
             batches of training comparisons scored for the train accuracy; ref_logprob
             adds the SFT model's mean log-prob of the reply as a feature
             (gptjax/reward_model.py)
"""

import ml_collections

from configs import model as model_presets
from configs.ppo import ppo_section

CPU_PRESETS = ("tiny", "small_cpu", "gpt2_4l")


def _world(name: str) -> ml_collections.ConfigDict:
    from gptjax.world.config import WorldConfig

    fields = WorldConfig().to_dict()
    fields["skill_mix"] = list(fields["skill_mix"])
    return ml_collections.ConfigDict(fields)


def _stage(
    steps: int,
    batch_size: int,
    seq_len: int,
    lr: float,
    warmup: int,
    checkpoint_every: int,
    eval_every: int,
) -> ml_collections.ConfigDict:
    from gptjax.optim import OptimConfig

    return ml_collections.ConfigDict(
        dict(
            steps=steps,
            batch_size=batch_size,  # global, in rows of seq_len tokens
            seq_len=seq_len,
            optim={**OptimConfig().__dict__, "lr": lr, "warmup_steps": warmup},
            z_loss=0.0,
            checkpoint_every=checkpoint_every,
            keep_checkpoints=3,
            eval_every=eval_every,  # 0 = only at the end
            eval_batches=8,
            log_every=10,
            # A non-finite loss or gradient: "skip" leaves params and optimizer state
            # unchanged (counted in metrics), "stop" ends the stage with the last good state.
            nonfinite="skip",
        )
    )


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
    name, opts = model_presets.parse_arg(arg)
    unknown = set(opts) - {"mesh"}
    if unknown:
        raise ValueError(f"unknown config arg options {sorted(unknown)} in {arg!r}; known: mesh")
    cpu = name in CPU_PRESETS
    c = ml_collections.ConfigDict()
    c.preset = name
    c.seeds = ml_collections.ConfigDict(dict(world=0, init=0, data=0, sampling=0))
    c.world = _world(name)
    c.data = ml_collections.ConfigDict(
        dict(
            pretrain="world",  # "world" | text:/f.txt | lines:/f.txt | jsonl:/f.jsonl | tfds:NAME
            data_dir="",  # prepared datasets; empty = <workdir>/data
            pretrain_heldout_fraction=0.02,  # of a user's corpus, held out for eval loss
            demos="world",  # "world" | demos:/path/demos.jsonl (formats: README)
            demos_heldout_fraction=0.05,  # of a user's demos, held out for eval loss
            # The RM's comparisons: "compare" (this workdir's compare stage) or
            # comparisons:/path/file.jsonl (HH chosen/rejected or ranked lists: README).
            comparisons="compare",
            comparisons_heldout_fraction=0.1,  # of a user's comparisons, for RM metrics
            # Share of malformed records in a user's file that are dropped (each reported
            # with file:line) instead of failing; above it the run stops before step 1.
            max_bad_fraction=0.0,
        )
    )
    c.tokenizer = ml_collections.ConfigDict(
        dict(
            path="",  # an existing .model to load, or empty to train one into the workdir
            vocab_size=512 if cpu else 32768,
            model_type="bpe",  # bpe | unigram
            # Model vocab = tokenizer vocab rounded up to this (TPU matmuls like 128).
            pad_vocab_to=64 if cpu else 128,
        )
    )
    c.model = model_presets.model_config(name)
    c.model.vocab_size = 0  # 0: the tokenizer's size, padded
    c.mesh = model_presets.mesh_config(opts.get("mesh", "cpu" if cpu else "tpu_vm"))

    c.eval = ml_collections.ConfigDict(
        dict(
            max_new_tokens=16,
            samples=4,  # temperature-1 replies per prompt, besides the greedy one
            temperature=1.0,
            seed=1234,  # fixed sampling seeds: every model is judged on the same draws
            batch_size=64,
            bootstrap=1000,
            max_prompts=0,  # 0 = every eval prompt
            best_of_n=4,  # the best-of-n variant's n (RM-picked SFT samples); <= 1: off
            lm_batches=8,  # held-out pretraining batches for the alignment-tax loss
            # Comma list of variants to evaluate (base zero-shot, base few-shot, SFT,
            # best-of-n, PPO, PPO-ptx); empty = every variant trained in the workdir.
            variants="",
        )
    )

    if name == "tiny":
        # Measured (calibration, world v2 with 12000 notes docs, RoPE): base fact
        # completion 0.40 after 600 steps, 0.98+ after 1000 (memorising is a late phase
        # transition); QA-format accuracy on people never asked about in pretraining
        # 0.59 at 1000 steps (5000 notes), 0.63-0.76 at 1300 (12000 notes).
        c.pretrain = _stage(1300, 32, 64, 3e-3, 50, 325, 0)
        # SFT overfits fast (3k demos, ~170 distinct demo facts): 300 steps at 1e-3 gave
        # 0.25 accuracy on people absent from the demos, 150 at 5e-4 0.48, 150 at 2e-4
        # 0.41, 60 at 1e-3 0.38 (128-prompt subsets, same base).
        c.sft = _stage(150, 32, 64, 5e-4, 10, 75, 0)
    elif name in CPU_PRESETS:
        c.tokenizer.vocab_size = 4096 if name == "small_cpu" else 512
        seq_len = 256 if name == "small_cpu" else 128
        c.pretrain = _stage(1000, 16, seq_len, 1e-3, 100, 250, 0)
        c.sft = _stage(300, 16, seq_len, 3e-4, 20, 100, 0)
    else:
        batch, seq_len, steps, lr = model_presets.TRAIN[name]
        if "mesh" not in opts and name in model_presets.TARGETS:
            c.mesh = model_presets.target_mesh(name)
        c.pretrain = _stage(steps, batch, seq_len, lr, 2000, 1000, 5000)
        c.sft = _stage(2000, 128, seq_len, 2e-5, 100, 500, 500)
    # Demos are short: pack several per row (segment ids keep them apart).
    c.sft.packed = True
    c.sft.init_from = ""  # a base checkpoint dir; empty = <workdir>/pretrain/checkpoints
    # Share of each SFT batch's rows that are pretraining text (loss on every token), so
    # fine-tuning on a few thousand demos does not erase pretraining knowledge; 0 = off.
    # Measured at tiny (same base model): without it SFT raised the held-out pretraining
    # loss 0.85 -> 1.37 and reached 0.56 on people absent from the demos; with 0.25,
    # 0.86 and 0.70; with 0.5, 0.85 and 0.71.
    c.sft.ptx_fraction = 0.25 if cpu else 0.0

    c.compare = ml_collections.ConfigDict(
        dict(
            k=4,  # replies sampled per prompt, 2..9 (InstructGPT ranked 4 to 9)
            n_prompts=1536 if cpu else 0,  # first n of the world's ppo_prompts; 0 = all
            heldout_fraction=0.15,  # of the prompts: the RM's held-out comparisons
            temperature=1.0,
            max_new_tokens=16,
            batch_size=256 if cpu else 512,  # sampled replies per generate call
            # Who ranks the replies: "" = the world's noisy gold labeler (label_noise), or
            # "module:function" taking (prompt_record, replies) -> ranks (0 best, ties ok).
            labeler="",
            init_from="",  # an SFT checkpoint dir to sample; empty = <workdir>/sft/checkpoints
        )
    )
    if cpu:
        # batch_size in prompts (x K replies); measured at tiny: experiments/rm.py docstring.
        c.rm = _stage(160, 16, 40, 3e-4, 10, 80, 0)
    else:
        c.rm = _stage(2000, 64, seq_len, 9e-6, 50, 500, 500)
    c.rm.k_max = 0  # responses per batch element; 0 = the most any comparison has
    # After training, the bias is set so these demonstrations average reward 0.
    c.rm.demo_samples = 512
    c.rm.init_from = ""  # an SFT checkpoint dir; empty = <workdir>/sft/checkpoints
    # The reference feature (gptjax/reward_model.py): the RM also reads the SFT model's
    # mean log-prob of the reply, with a learned weight. Measured at tiny: see
    # experiments/rm.py. Off for the TPU presets: the InstructGPT RM, head only.
    c.rm.ref_logprob = cpu

    # RLHF: clipped PPO against the RM, and PPO-ptx (field docs: configs/ppo.py).
    c.ppo = ppo_section(name, ptx=False)
    c.ppo_ptx = ppo_section(name, ptx=True)
    if not cpu:  # microbatching etc. that fit the preset's TPU slice (configs/model.py)
        model_presets.apply_fit(c, name)
    return c
