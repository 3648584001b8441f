"""The pipeline config: every stage's settings, as named presets.

    python -m experiments.main            # = --config=configs/pipeline.py:tiny
    python -m experiments.main --config=configs/pipeline.py:tiny --workdir=runs/tiny \
        --config.pretrain.steps=200
    python -m experiments.main --config=configs/pipeline.py:small_cpu
    python -m experiments.main --config=configs/pipeline.py:gpt2_124m,mesh=tpu_vm \
        --config.data.pretrain=tfds:lm1b                          # on a TPU VM

Presets: tiny (CPU, minutes), small_cpu (CPU, ~12M params), gpt2_4l (CPU, the benchmark's
mid-size shape), gpt2_124m, gpt2_350m, gpt2_1.5b, llama_1b, llama_7b, gpt3_175b (TPU;
each with a target slice and the settings that fit it, configs/model.py TARGETS/FITS).
The arg is `MODEL[,mesh=MESH][,rounds=2][,reasoning=1][,heldout_rm=1]` (rounds=2: a
second comparison round from the PPO policy, `_second_round`; reasoning=1: the world's
multi-step tasks, chain-of-thought and tool demos, and the calc and lookup tools,
`_reasoning`; heldout_rm=1: an RM on other comparisons that judges every variant,
`_heldout_rm`). The
sections are written for the TPU presets; the CPU presets are shrunk in one place,
`_runlocal` (big_vision's runlocal).

Sections (each field documented once: in the dataclass named, or next to its value here):
  seeds      separate seeds for the world, init, data order and sampling, so one can be
             varied while the others stay fixed (e.g. init seeds over fixed data)
  world      the built-in assistant world (gptjax/world/config.py WorldConfig)
  data       where each stage's data comes from (below)
  tokenizer  sentencepiece training settings (below)
  model      architecture (gptjax/model.py ModelConfig; presets in configs/model.py);
             vocab_size 0 = the tokenizer's, padded
  mesh       device mesh (gptjax/sharding.py MeshConfig)
  eval       the evaluator's fixed protocol (gptjax/evaluate.py Protocol) and variants
  pretrain, sft, rm   one-step-per-batch stages: batch fields (gptjax/train_steps.py
             TrainConfig), optim (gptjax/optim.py OptimConfig), the loop's fields
             (experiments/loop.py LoopConfig), eval_batches and their own fields (below)
  compare    comparison collection: K replies per prompt sampled from SFT, ranked by a
             labeler, written to <workdir>/compare/ (experiments/stages/compare.py)
  ppo, ppo_ptx  RLHF with clipped PPO, without and with the pretraining loss (configs/ppo.py)
  grpo, rloo    critic-free online RL, G replies per prompt (configs/grpo.py)
  ppo_gold, grpo_gold, rloo_gold  the same methods with the world's gold labeler as the
             reward (RL from a verifiable reward; reported apart from RM-trained methods)
  dpo        DPO / IPO on the RM's comparisons (configs/dpo.py)
  tools      the tools models may call, and the caps of a tool-using reply (below)
  reason     thinking and tools, evaluated: direct / chain of thought / self-consistency
             / tools per task kind (experiments/stages/reason.py)
  instances  more stage instances, e.g. a second comparison round (experiments/pipeline.py)
"""

import ml_collections

from configs import model as model_presets
from configs.dpo import dpo_section
from configs.grpo import group_section
from configs.ppo import ppo_section
from experiments.loop import LoopConfig
from gptjax import config as config_lib
from gptjax.evaluate import Protocol
from gptjax.optim import OptimConfig
from gptjax.train_steps import TrainConfig
from gptjax.world.config import WorldConfig


def _stage(
    steps: int,
    batch_size: int,
    seq_len: int,
    lr: float,
    warmup: int,
    checkpoint_every: int,
    eval_every: int,
) -> ml_collections.ConfigDict:
    loop = LoopConfig(steps=steps, checkpoint_every=checkpoint_every, eval_every=eval_every)
    c = config_lib.section(TrainConfig(), steps=steps, batch_size=batch_size, seq_len=seq_len)
    c.optim = config_lib.section(OptimConfig(), lr=lr, warmup_steps=warmup)
    for name in ("checkpoint_every", "keep_checkpoints", "eval_every", "log_every", "nonfinite"):
        c[name] = getattr(loop, name)
    c.eval_batches = 8  # held-out batches for the eval loss (RM: of training comparisons)
    return c


def _data() -> ml_collections.ConfigDict:
    """Where each stage's data comes from."""
    return ml_collections.ConfigDict(
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
            # Share of the world's ppo_prompts kept for comparisons (the compare stage's
            # first n_prompts are taken from it); RL stages train on the others: the RM
            # and the policy never see the same prompts (InstructGPT's split).
            rm_prompt_share=0.75,
            # Share of malformed records in a user's file that are dropped (each reported
            # with file:line) instead of failing; above it the run stops before step 1.
            max_bad_fraction=0.0,
        )
    )


def _compare() -> ml_collections.ConfigDict:
    """Comparison collection (experiments/stages/compare.py)."""
    return ml_collections.ConfigDict(
        dict(
            k=4,  # replies sampled per prompt, 2..9 (InstructGPT ranked 4 to 9)
            n_prompts=0,  # first n of the prompts kept for it (data.rm_prompt_share); 0 = all
            heldout_fraction=0.15,  # of the prompts: the RM's held-out comparisons
            temperature=1.0,
            # Replies from several policies, as InstructGPT collected them: a comma list of
            # temperatures cycled over the sampled replies ("0.7,1.0,1.3"); empty = all at
            # `temperature`.
            temperatures="",
            # The last of the K replies is the world demonstrator's (as in the SFT demos).
            demonstration=False,
            max_new_tokens=16,
            batch_size=512,  # sampled replies per generate call
            # Added to seeds.sampling for the replies and the labeler's noise: another
            # instance with another offset collects other comparisons on the same prompts.
            seed_offset=0,
            # Who ranks the replies: "" = the world's noisy gold labeler (label_noise), or
            # "module:function" taking (prompt_record, replies) -> ranks (0 best, ties ok).
            labeler="",
            init_from="",  # an SFT checkpoint dir to sample; empty = <workdir>/sft/checkpoints
        )
    )


def _tools() -> ml_collections.ConfigDict:
    """The tools models may call (experiments/toolbox.py, gptjax/tools.py)."""
    return ml_collections.ConfigDict(
        dict(
            # "calc,lookup" (built in) and a user's "module:function"; empty = none. Set
            # before pretraining: the tokenizer gets the call and result markers.
            names="",
            max_calls=3,  # per reply; a further call ends the reply there, unterminated
            max_result_tokens=24,  # a longer result is cut
            lookup_k=1,  # passages a lookup returns
        )
    )


def _reason() -> ml_collections.ConfigDict:
    """The reasoning evaluation (experiments/stages/reason.py)."""
    return ml_collections.ConfigDict(
        dict(
            max_prompts=0,  # of the world's reason_eval tasks; 0 = all
            # Modes asked for: direct, cot (chain of thought), sc (self-consistency: a
            # majority vote over sc_samples chains), tools (needs tools.names).
            modes="direct,cot,sc,tools",
            sc_samples=8,
            sc_temperature=0.7,  # Wang et al. 2023 sampled chains at 0.5-0.7
            # A chain or a tool turn is longer than an answer (capped by model.max_len).
            max_new_tokens=48,
        )
    )


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
    name, opts = model_presets.parse_arg(arg)
    unknown = set(opts) - {"mesh", "rounds", "reasoning", "heldout_rm"}
    if unknown:
        raise ValueError(
            f"unknown config arg options {sorted(unknown)} in {arg!r}; "
            "known: mesh, rounds, reasoning, heldout_rm"
        )
    c = ml_collections.ConfigDict()
    c.preset = name
    c.seeds = ml_collections.ConfigDict(dict(world=0, init=0, data=0, sampling=0))
    c.world = config_lib.section(WorldConfig())
    del c.world["seed"]  # seeds.world
    c.data = _data()
    c.tokenizer = ml_collections.ConfigDict(
        dict(
            path="",  # an existing .model to load, or empty to train one into the workdir
            vocab_size=32768,
            model_type="bpe",  # bpe | unigram
            # Model vocab = tokenizer vocab rounded up to this (TPU matmuls like 128).
            pad_vocab_to=128,
        )
    )
    c.model = model_presets.model_config(name)
    c.model.vocab_size = 0  # 0: the tokenizer's size, padded
    # "hf:/path/to/dir": start from a Hugging Face checkpoint (config.json, safetensors,
    # tokenizer.json, chat template): SFT and everything downstream use its architecture,
    # weights, tokenizer and template (gptjax/hf), and the model fields above are ignored
    # except remat, scan_layers, dropout and the LoRA fields. No pretrain stage then.
    c.model.init_from = ""
    # With init_from: the params' and the compute dtype (float32 | bfloat16 | float16);
    # empty = the checkpoint's own (a bf16 checkpoint stays bf16).
    c.model.init_param_dtype = ""
    c.model.init_dtype = ""
    if "mesh" in opts:
        c.mesh = model_presets.mesh_config(opts["mesh"])
    elif name in model_presets.TARGETS:
        c.mesh = model_presets.target_mesh(name)
    else:
        c.mesh = model_presets.mesh_config("tpu_vm")

    c.eval = config_lib.section(Protocol())
    c.eval.update(
        dict(
            max_prompts=0,  # 0 = every eval prompt
            # What is evaluated: "world" (its held-out prompts, judged by its gold labeler)
            # or a prompts file read as the RL stages read theirs (demos:/path, ...): then
            # the gold column is eval.reward's, if set.
            prompts="world",
            # "module:function" scoring a user's prompts' replies like an RL reward
            # (prompts=, completions=, ended=): the gold reward and win rate columns.
            reward="",
            best_of_n=4,  # the best-of-n variant's n (RM-picked SFT samples); <= 1: off
            # More best-of-n variants, one per n (a reference curve of gold against KL).
            best_of_curve=(),
            # Draws of SFT samples (each eval.samples replies a prompt) pooled per prompt
            # for best-of-n's exact KL; 0 = those of the largest n, sampled anyway.
            best_of_pool=0,
            lm_batches=8,  # held-out pretraining batches for the alignment-tax loss
            # SFT sampled at these temperatures (< 1), each a variant "SFT T=<t>": the
            # baselines whose KL to SFT an RL method's is matched to; empty = none.
            sft_temperatures=(),
            # Comma list of variants to evaluate (base zero-shot, base few-shot, SFT,
            # best-of-n, SFT T, PPO, PPO-ptx, GRPO, RLOO, DPO, "PPO (gold reward)", ...);
            # empty = every variant trained in the workdir.
            variants="",
        )
    )

    batch, seq_len, steps, lr = model_presets.TRAIN.get(name, model_presets.TRAIN["gpt2_124m"])
    c.pretrain = _stage(steps, batch, seq_len, lr, 2000, 1000, 5000)
    c.sft = _stage(2000, 128, seq_len, 2e-5, 100, 500, 500)
    c.sft.packed = True  # demos are short: pack several per row (segment ids keep them apart)
    c.sft.init_from = ""  # a base checkpoint dir; empty = <workdir>/pretrain/checkpoints
    # Share of each SFT batch's rows that are pretraining text (loss on every token), so
    # fine-tuning on a few thousand demos does not erase pretraining knowledge; 0 = off.
    c.sft.ptx_fraction = 0.0

    c.compare = _compare()
    # batch_size in prompts (each with its K replies).
    c.rm = _stage(2000, 64, seq_len, 9e-6, 50, 500, 500)
    c.rm.k_max = 0  # responses per batch element; 0 = the most any comparison has
    # After training, the bias is set so these demonstrations average reward 0.
    c.rm.demo_samples = 512
    c.rm.init_from = ""  # an SFT checkpoint dir; empty = <workdir>/sft/checkpoints
    # The reference feature (gptjax/reward_model.py): the RM also reads the SFT model's
    # mean log-prob of the reply, with a learned weight. Off: the InstructGPT RM, head only.
    c.rm.ref_logprob = False

    c.ppo = ppo_section(ptx=False)
    c.ppo_ptx = ppo_section(ptx=True)
    c.grpo, c.rloo = group_section("grpo"), group_section("rloo")
    c.ppo_gold = ppo_section(ptx=False, reward="gold")
    c.grpo_gold, c.rloo_gold = group_section("grpo", "gold"), group_section("rloo", "gold")
    c.dpo = dpo_section()
    c.tools = _tools()
    c.reason = _reason()
    if name in model_presets.CPU_PRESETS:
        _runlocal(c, name)
    else:  # microbatching etc. that fit the preset's TPU slice (configs/model.py)
        model_presets.apply_fit(c, name)
    if opts.get("rounds", "1") != "1":
        if opts["rounds"] != "2":
            raise ValueError(f"rounds={opts['rounds']}: 1 or 2")
        _second_round(c)
    if opts.get("reasoning", "0") != "0":
        if opts["reasoning"] != "1":
            raise ValueError(f"reasoning={opts['reasoning']}: 0 or 1")
        _reasoning(c)
    if opts.get("heldout_rm", "0") != "0":
        if opts["heldout_rm"] != "1":
            raise ValueError(f"heldout_rm={opts['heldout_rm']}: 0 or 1")
        _heldout_rm(c)
    return c


def _reasoning(c: ml_collections.ConfigDict) -> None:
    """`reasoning=1`: the world's multi-step tasks, demos that think or call tools, and
    RL on tool-using rollouts.
        python -m experiments.main --config=configs/pipeline.py:tiny,reasoning=1 \
            --stages=pretrain,sft,grpo_gold,reason --workdir=runs/reasoning
    A third of the reasoning demos each answer directly, think step by step, or call a
    tool; worked solutions in pretraining teach the base model to copy operands and
    results (without them, tool replies miscopied both: arithmetic with tools 0.01).
    SFT trains twenty times as long: tool replies copy operands and results digit by digit,
    and at temperature 1 the copies sharpen with training (arithmetic with tools, T=1, over
    3 seeds: 0.885 [0.80, 0.97] after 1,500 steps, 0.952 [0.92, 0.98] after 3,000; on one
    seed 0.23 after 600). grpo_gold and ppo_gold train on the world's reasoning tasks asked
    with the tools cue, with tools in the rollouts and the final answer as the reward (1
    right, 0 not), for 300 iterations (README, Thinking and tools)."""
    c.world.update(
        n_reason_demos=2048,
        n_reason_eval=400,
        n_reason_prompts=1024,
        cot_demo_frac=1 / 3,
        tool_demo_frac=1 / 3,
        n_worked_docs=4000,
    )
    c.tools.names = "calc,lookup"
    c.sft.steps *= 20
    for section in (c.ppo_gold, c.grpo_gold, c.rloo_gold):
        # A prompt with its cue and a tool turn with its answer fill a 64-token model.
        section.update(
            prompts="reason:tools", tools=True, max_prompt_len=28, eval_prompts=0, iterations=300
        )
        section.max_new_tokens = c.model.max_len - section.max_prompt_len


def _second_round(c: ml_collections.ConfigDict) -> None:
    """`rounds=2`: InstructGPT's iterated collection. compare_2 samples the round-1 PPO
    policy on the same prompts and keeps round 1's comparisons (so the labeler now ranks
    the policy's abstentions against right answers too); rm_2 trains on both rounds;
    ppo_2 trains from SFT against rm_2; eval_2 evaluates it (as "PPO", rm_2 as the RM).
        python -m experiments.main --config=configs/pipeline.py:tiny,rounds=2 \
            --stages=compare_2,rm_2,ppo_2,eval_2 --workdir=RUN   # after a default run
    """
    for name in ("compare", "rm", "ppo", "eval"):
        c[f"{name}_2"] = c[name].copy_and_resolve_references()
    c.instances = {
        "compare_2": {"like": "compare", "reads": {"init": "ppo", "previous": "compare"}},
        "rm_2": {"like": "rm", "reads": {"comparisons": "compare_2"}},
        "ppo_2": {"like": "ppo", "reads": {"rm": "rm_2"}},
        "eval_2": {"like": "eval", "reads": {"ppo": "ppo_2", "rm": "rm_2"}},
    }


def _heldout_rm(c: ml_collections.ConfigDict) -> None:
    """`heldout_rm=1`: a second RM, trained on other comparisons (other replies and label
    noise on the same prompts: compare_heldout, seed_offset 1), that no policy is trained
    against; the evaluator reports its reward of every variant ("heldout_rm_reward"), a
    judge that PPO cannot have exploited.
        python -m experiments.main --config=configs/pipeline.py:tiny,heldout_rm=1 \
            --stages=compare_heldout,rm_heldout,eval --workdir=RUN   # after a default run
    """
    c.compare_heldout = c.compare.copy_and_resolve_references()
    c.compare_heldout.seed_offset = 1
    c.rm_heldout = c.rm.copy_and_resolve_references()
    c.instances = {
        **(c.get("instances") or {}),
        "compare_heldout": {"like": "compare"},
        "rm_heldout": {"like": "rm", "reads": {"comparisons": "compare_heldout"}},
        # The evaluator's rows, plus the held-out RM (required: the point of the option).
        "eval": {"like": "eval", "reads": {"heldout_rm": "rm_heldout"}},
    }


def _runlocal(c: ml_collections.ConfigDict, name: str) -> None:
    """Everything the CPU presets change: small vocabularies, short sequences, few steps,
    one device. Measurements behind these values: docs/notes.md."""
    c.tokenizer.vocab_size = 4096 if name == "small_cpu" else 512
    c.tokenizer.pad_vocab_to = 64
    c.mesh = model_presets.mesh_config("cpu")
    if name == "tiny":
        c.pretrain = _stage(1300, 32, 64, 3e-3, 50, 325, 0)
        c.sft = _stage(150, 32, 64, 5e-4, 10, 75, 0)
    else:
        seq_len = 256 if name == "small_cpu" else 128
        c.pretrain = _stage(1000, 16, seq_len, 1e-3, 100, 250, 0)
        c.sft = _stage(300, 16, seq_len, 3e-4, 20, 100, 0)
    c.sft.update(packed=True, init_from="", ptx_fraction=0.25)
    c.compare.update(n_prompts=1536, batch_size=256)
    rm_fields = {k: c.rm[k] for k in ("k_max", "demo_samples", "init_from")}
    c.rm = _stage(160, 16, 40, 3e-4, 10, 80, 0)
    c.rm.update(rm_fields, ref_logprob=True)
    rl = dict(
        iterations=20,
        max_prompt_len=20,
        max_new_tokens=16,
        minibatches=2,  # 2 x 32 rows: small minibatches cost more per token on a CPU
        eval_every=10,
        eval_prompts=128,
        checkpoint_every=10,
    )
    for section in (c.ppo, c.ppo_ptx, c.ppo_gold):
        section.update(rl, prompts_per_iteration=64, kl_coef=0.3, ptx_batch_size=16, ptx_seq_len=64)
        # With kl_target set, the controller's horizon in rollouts scaled to the run (1,280
        # rollouts): β may move ±25% per iteration (0.2 x 64 / 256) instead of the 2.6%
        # over the whole run the default 10,000 (lm-human-preferences') would allow.
        section.kl_horizon = 256.0
        section.optim.lr = 1e-4
    # 16 prompts x 4 replies: the 64 sampled replies per iteration of PPO's sections.
    # β = 0.3 for every method, as PPO's (pilot runs: docs/notes.md).
    for section in (c.grpo, c.rloo, c.grpo_gold, c.rloo_gold):
        section.update(rl, prompts_per_iteration=16, epochs=2, kl_coef=0.3)
        section.optim.lr = 1e-4
    dpo_fields = {k: c.dpo[k] for k in ("loss", "k_max", "init_from")}
    c.dpo = _stage(160, 16, 40, 5e-5, 10, 80, 0)  # the RM's comparisons and shapes
    c.dpo.update(dpo_fields, beta=0.3)
    c.dpo.optim.weight_decay = 0.0
