"""`python -m experiments.export`: a run's stages as Hugging Face directories that
transformers loads and that compute what gptjax computes."""

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from gptjax.hf.model import export_model
from gptjax.model import ModelConfig, get_model
from tests.fault_helpers import ROOT, fresh_copy
from tests.helpers import subprocess_env


def _export(workdir, stage, out):
    cmd = [sys.executable, "-m", "experiments.export", f"--workdir={workdir}",
           f"--stage={stage}", f"--out={out}"]  # fmt: skip
    return subprocess.run(
        cmd, env=subprocess_env(), capture_output=True, text=True, timeout=300, cwd=ROOT
    )


def test_export_sft_stage_loads_in_transformers(tiny_run, tmp_path):
    from experiments import sources
    from gptjax.data import chat

    workdir = fresh_copy(tiny_run, tmp_path / "run")
    out = tmp_path / "sft_hf"
    result = _export(workdir, "sft", out)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "sft: gpt_neox causal LM" in result.stdout
    assert (out / "gptjax_tokenizer.model").exists()
    config = sources.load_run_config(str(workdir))
    tokenizer = sources.get_tokenizer(config, str(workdir))
    model, params = sources.load_stage_params(config, str(workdir), "sft", tokenizer)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
    ids = chat.render_prompt([{"role": "user", "content": "where does ka ri live?"}], tokenizer)
    tokens = np.array([ids])
    with torch.no_grad():
        theirs = hf(torch.tensor(tokens)).logits.numpy()
    ours = np.asarray(model.apply(params, jnp.asarray(tokens)))
    np.testing.assert_allclose(ours, theirs, atol=1e-4)
    saved = json.loads((out / "config.json").read_text())
    assert saved["eos_token_id"] == tokenizer.eos_id and saved["pad_token_id"] == tokenizer.pad_id

    # experiments.chat answers the same from the export as from the run.
    def chat(*flags):
        cmd = [sys.executable, "-m", "experiments.chat", "--prompt=what is 3 plus 4?", *flags]
        result = subprocess.run(
            cmd, env=subprocess_env(), capture_output=True, text=True, timeout=300, cwd=ROOT
        )
        assert result.returncode == 0, result.stderr[-2000:]
        return result.stdout.strip().splitlines()[-1]

    assert chat(f"--hf={out}") == chat(f"--workdir={workdir}", "--stage=sft")


def test_export_names_what_it_cannot_do(tiny_run, tmp_path):
    workdir = fresh_copy(tiny_run, tmp_path / "run")
    result = _export(workdir, "compare", tmp_path / "x")
    assert result.returncode == 2 and "trains no model" in result.stderr
    result = _export(workdir, "ppo", tmp_path / "x")
    assert result.returncode == 2 and "no ppo checkpoints" in result.stderr


def test_reward_model_exports_as_a_sequence_classifier(tmp_path):
    cfg = ModelConfig(vocab_size=97, d_model=32, n_heads=4, d_ff=64, positions="rope",
                      head="scalar")  # fmt: skip
    params = get_model(cfg).init(jax.random.key(0))
    params["score_w"] = jax.random.normal(jax.random.key(1), params["score_w"].shape)
    params["score_b"] = jnp.asarray(0.3)
    out = str(tmp_path / "rm")
    assert export_model(out, params, cfg, pad_token_id=0) == "gpt_neox"
    saved = json.loads(open(f"{out}/config.json").read())
    assert saved["architectures"] == ["GPTNeoXForSequenceClassification"]
    assert abs(saved["gptjax_score_bias"] - 0.3) < 1e-7
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(out).eval()
    tokens = np.array([[5, 6, 7, 8, 9, 0, 0], [3, 4, 5, 6, 7, 8, 9]])
    lengths = np.array([5, 7])
    seg = (np.arange(7)[None] < lengths[:, None]).astype(np.int32)
    with torch.no_grad():
        theirs = hf(torch.tensor(tokens), attention_mask=torch.tensor(seg)).logits[:, 0].numpy()
    values = np.asarray(get_model(cfg).apply(params, jnp.asarray(tokens), jnp.asarray(seg)))
    ours = values[np.arange(2), lengths - 1] - 0.3
    np.testing.assert_allclose(ours, theirs, atol=1e-5)
    params["score_logp"] = jnp.asarray(1.0)  # the reference feature: not expressible
    with pytest.raises(ValueError, match="rm.ref_logprob=False"):
        export_model(str(tmp_path / "rm2"), params, cfg)


@pytest.mark.parametrize("name", ["tiny", "gpt2_4l"])
def test_the_pytorch_benchmark_reference_is_the_same_model(name):
    """`bench compare`'s ratios are fair only if the PyTorch GPT has gptjax's parameter
    count and its decode reference computes gptjax's greedy tokens on the same weights."""
    from configs import pipeline
    from experiments import bench, bench_torch
    from gptjax import sampling
    from gptjax.model import Model, from_pipeline

    cfg = from_pipeline(pipeline.get_config(name))
    model = Model(cfg)
    assert sum(p.numel() for p in bench_torch.GPT(cfg).parameters()) == model.param_count()
    params = bench._decode_params(model)
    prompts = np.random.default_rng(0).integers(3, cfg.vocab_size, (3, 5), dtype=np.int32)
    ours, _, _ = sampling.generate(
        model, params, prompts, np.ones_like(prompts), np.arange(3), max_new_tokens=6, eos_id=-1
    )
    theirs = bench_torch.hf_greedy(cfg, params, prompts, 6, threads=1)()
    np.testing.assert_array_equal(np.asarray(ours), theirs)
