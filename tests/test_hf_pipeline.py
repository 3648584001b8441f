"""Start from a Hugging Face checkpoint, through the documented commands: a tiny random
Llama written by transformers -> sft on demos -> rm on an Anthropic-HH file -> ppo on a
prompts file -> eval on the prompts with a user reward function -> export -> transformers
loads it and generates."""

import json
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import torch
import transformers

from tests.fault_helpers import ROOT, main_cmd, run_cli
from tests.helpers import subprocess_env
from tests.hf_helpers import write_checkpoint, write_user_data

STAGE_FLAGS = [
    "--config.sft.steps=4", "--config.sft.batch_size=8", "--config.sft.seq_len=32",
    "--config.sft.eval_batches=1", "--config.sft.ptx_fraction=0",
    "--config.rm.steps=2", "--config.rm.batch_size=4", "--config.rm.seq_len=32",
    "--config.rm.eval_batches=1", "--config.rm.demo_samples=8",
    "--config.rm.ref_logprob=False",
    "--config.ppo.iterations=2", "--config.ppo.prompts_per_iteration=4",
    "--config.ppo.max_prompt_len=24", "--config.ppo.max_new_tokens=8",
    "--config.ppo.epochs=1", "--config.ppo.minibatches=1", "--config.ppo.eval_prompts=0",
    "--config.eval.max_prompts=8", "--config.eval.lm_batches=1", "--config.eval.best_of_n=2",
    "--config.eval.samples=2", "--config.eval.max_new_tokens=8",
    "--config.eval.reward=tests.reward_fns:exact_sum",
]  # fmt: skip


def test_sft_rm_ppo_export_from_a_hugging_face_checkpoint(tmp_path):
    from experiments import sources

    ckpt = write_checkpoint(tmp_path / "ckpt")
    data = write_user_data(tmp_path)
    workdir = tmp_path / "run"
    flags = [
        f"--config.model.init_from=hf:{ckpt}",
        f"--config.data.demos=demos:{data['demos']}",
        f"--config.data.comparisons=comparisons:{data['hh']}",
        f"--config.ppo.prompts=demos:{data['prompts']}",
        f"--config.eval.prompts=demos:{data['prompts']}",
        *STAGE_FLAGS,
    ]
    out = run_cli(main_cmd(workdir, "sft,rm,ppo,eval", *flags))
    assert out.returncode == 0, out.stderr[-3000:]
    assert "replies end at '<|im_end|>'" in out.stdout  # the template's end of turn, said
    assert "[gate" not in out.stdout  # the world's gates do not judge a user's model

    # Evaluation off the world: the user's reward function is the gold column.
    results = json.loads((workdir / "eval" / "results.json").read_text())
    assert set(results["variants"]) == {"base zero-shot", "SFT", "best-of-2", "PPO"}
    sample = results["variants"]["PPO"]["sample"]
    for metric in ("gold_reward", "rm_reward", "win_rate_gold_vs_sft", "win_rate_rm_vs_sft",
                   "kl_to_sft", "entropy", "length_tokens", "eos_rate"):  # fmt: skip
        assert sample[metric]["n"] == 8, metric  # every prompt
    assert sample["distinct_2"]["n"] >= 1  # prompts whose samples have bigrams
    assert 0.0 <= sample["gold_reward"]["mean"] <= 1.0
    assert "heldout_lm_loss" in results["variants"]["PPO"]["model"]
    export = tmp_path / "ppo_hf"
    result = subprocess.run(
        [sys.executable, "-m", "experiments.export", f"--workdir={workdir}", "--stage=ppo",
         f"--out={export}"],
        env=subprocess_env(), capture_output=True, text=True, timeout=300, cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert "ppo: llama causal LM" in result.stdout

    # transformers reads the policy with the checkpoint's tokenizer and template.
    tok = transformers.AutoTokenizer.from_pretrained(str(export))
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(export)).eval()
    messages = [{"role": "user", "content": "what is 2 plus 3?"}]
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)
    tokens = torch.tensor([ids["input_ids"]])
    generated = hf.generate(tokens, max_new_tokens=4, do_sample=False)
    assert generated.shape[1] > tokens.shape[1]

    # gptjax's PPO policy computes the same logits, on the same ids.
    config = sources.load_run_config(str(workdir), "ppo")
    tokenizer = sources.get_tokenizer(config, str(workdir))
    from gptjax.data import chat

    assert chat.render_prompt(messages, tokenizer) == ids["input_ids"]
    model, params = sources.load_stage_params(config, str(workdir), "ppo", tokenizer)
    ours = np.asarray(model.apply(params, jnp.asarray(tokens.numpy())))
    with torch.no_grad():
        theirs = hf(tokens).logits.numpy()
    np.testing.assert_allclose(ours, theirs, atol=1e-4)


def test_a_bad_checkpoint_path_fails_before_any_stage(tmp_path):
    out = run_cli(main_cmd(tmp_path / "run", "sft", "--config.model.init_from=hf:/no/such/dir"))
    assert out.returncode != 0
    assert "model.init_from" in out.stderr and "no config.json" in out.stderr
    assert not (tmp_path / "run" / "sft").exists()


def test_pretraining_from_a_checkpoint_is_refused(tmp_path):
    ckpt = write_checkpoint(tmp_path / "ckpt")
    out = run_cli(main_cmd(tmp_path / "run", "pretrain", f"--config.model.init_from=hf:{ckpt}"))
    assert out.returncode != 0 and "starts at sft" in out.stderr


def _model_fields(ckpt):
    import dataclasses

    from gptjax.hf import config as hf_config

    cfg = hf_config.to_model_config(hf_config.read(ckpt))
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}


def test_a_user_reward_needs_user_prompts(tmp_path):
    out = run_cli(
        main_cmd(tmp_path / "run", "eval", "--config.eval.reward=tests.reward_fns:exact_sum")
    )
    assert out.returncode != 0 and "eval.reward" in out.stderr and "eval.prompts" in out.stderr


def test_lora_sft_rm_dpo_ppo_from_a_checkpoint(tmp_path):
    """--config.model.lora_rank: SFT, the RM, DPO and PPO train adapters (and a head) only; the
    base weights in their checkpoints are the imported ones, bit for bit, and hold no
    optimizer moments; export merges the adapters, --peft writes them alone for peft."""
    import jax
    import peft

    from gptjax.hf.model import import_model
    from tests.fault_helpers import saved_items

    ckpt = write_checkpoint(tmp_path / "ckpt")
    data = write_user_data(tmp_path)
    workdir = tmp_path / "run"
    flags = [
        f"--config.model.init_from=hf:{ckpt}",
        "--config.model.lora_rank=4",
        f"--config.data.demos=demos:{data['demos']}",
        f"--config.data.comparisons=comparisons:{data['hh']}",
        *STAGE_FLAGS,
    ]
    flags += [f"--config.dpo.{k}={v}" for k, v in
              dict(steps=2, batch_size=4, seq_len=32, checkpoint_every=100).items()]  # fmt: skip
    flags.append(f"--config.ppo.prompts=demos:{data['prompts']}")
    out = run_cli(main_cmd(workdir, "sft,rm,dpo,ppo", *flags))
    assert out.returncode == 0, out.stderr[-3000:]
    _, base, _ = import_model(ckpt)
    saved = saved_items(workdir / "sft" / "checkpoints", 4, ("params", "opt_state"))
    blocks = saved["params"]["blocks"]
    for name in ("wq", "wk", "w_gate", "w_down"):
        np.testing.assert_array_equal(blocks[name], np.asarray(base["blocks"][name]))
        assert np.abs(blocks[name + "_lora_b"]).max() > 0  # the adapters trained
    adapter_shapes = {v.shape for k, v in blocks.items() if k.endswith(("_lora_a", "_lora_b"))}
    for leaf in jax.tree.leaves(saved["opt_state"]):
        assert leaf.shape == () or leaf.shape in adapter_shapes, leaf.shape
    for stage in ("rm", "dpo"):
        trained = saved_items(workdir / stage / "checkpoints", 2, ("params",))["params"]
        np.testing.assert_array_equal(trained["blocks"]["wq"], np.asarray(base["blocks"]["wq"]))
    # PPO: the policy starts as the merged SFT model with zero adapters, and its reference
    # is that model: no KL at the first iteration; the base stays the merged SFT model.
    rows = [json.loads(x) for x in open(workdir / "ppo" / "metrics.jsonl")]
    assert [r["kl"] for r in rows if "kl" in r][0] == 0.0
    from gptjax import lora
    from gptjax.model import ModelConfig

    sft_cfg = ModelConfig(**{**_model_fields(ckpt), "lora_rank": 4})
    merged, _ = lora.merge(saved["params"], sft_cfg)
    policy = saved_items(workdir / "ppo" / "checkpoints", 2, ("params",))["params"]["blocks"]
    np.testing.assert_allclose(policy["wq"], np.asarray(merged["blocks"]["wq"]), atol=1e-6)
    assert np.abs(policy["wq_lora_b"]).max() > 0

    export = tmp_path / "sft_hf"
    result = subprocess.run(
        [sys.executable, "-m", "experiments.export", f"--workdir={workdir}", "--stage=sft",
         f"--out={export}", "--peft"],
        env=subprocess_env(), capture_output=True, text=True, timeout=300, cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert "LoRA rank 4 merged" in result.stdout
    merged = transformers.AutoModelForCausalLM.from_pretrained(str(export)).eval()
    adapted = peft.PeftModel.from_pretrained(
        transformers.AutoModelForCausalLM.from_pretrained(ckpt), str(export / "adapter")
    ).eval()
    tokens = torch.tensor([[5, 9, 17, 33, 65, 129, 7, 8]])
    with torch.no_grad():
        a, b = merged(tokens).logits.numpy(), adapted(tokens).logits.numpy()
    np.testing.assert_allclose(a, b, atol=1e-4)


def test_pretraining_refuses_lora(tmp_path):
    out = run_cli(main_cmd(tmp_path / "run", "pretrain", "--config.model.lora_rank=4"))
    assert out.returncode != 0 and "model.lora_rank" in out.stderr


def test_a_bf16_checkpoint_keeps_its_dtype_unless_the_config_asks(tmp_path):
    import torch
    import transformers

    from configs import pipeline
    from gptjax.model import from_pipeline

    directory = str(tmp_path / "ckpt")
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1,
                                   num_attention_heads=4, intermediate_size=48)  # fmt: skip
    transformers.AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16).save_pretrained(directory)
    config = pipeline.get_config("tiny")
    config.model.init_from = f"hf:{directory}"
    kept = from_pipeline(config, 64)
    assert (kept.param_dtype, kept.dtype) == ("bfloat16", "bfloat16")
    config.model.init_param_dtype = "float32"
    asked = from_pipeline(config, 64)
    assert (asked.param_dtype, asked.dtype) == ("float32", "bfloat16")
