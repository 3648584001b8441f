"""Export a trained stage of a run as a Hugging Face model directory.

    python -m experiments.export --workdir=runs/default --stage=ppo --out=runs/ppo_hf
    python -m experiments.export --workdir=runs/default --stage=rm --out=runs/rm_hf

A policy (base, sft, ppo, ppo_ptx, dpo, grpo, rloo, the *_gold variants, any instance of
them) is written as the causal LM of the architecture that holds the model exactly
(gptjax/hf/config.py export_type: gptjax's CPU presets, rotary positions with LayerNorm
and GELU, are GPT-NeoX; learned positions GPT-2; RMSNorm and SwiGLU Llama); a reward
model as that architecture's *ForSequenceClassification (gptjax/hf/model.py). Load either
with `transformers.AutoModelFor...from_pretrained(out)`.

A run started from a Hugging Face checkpoint (model.init_from) exports as that checkpoint's
architecture, with its config.json fields and tokenizer files. For gptjax's own models,
the sentencepiece model is copied as `gptjax_tokenizer.model`, with its special ids in
config.json. transformers' own conversion of a sentencepiece file
splits whitespace and digits differently from the options gptjax trains with, so no
tokenizer.json is written: encode with `sentencepiece` (`gptjax.data.tokenizer`).
"""

from __future__ import annotations

import json
import os
import shutil
import sys

from absl import flags, logging

from experiments import cli, pipeline, sources
from gptjax import lora
from gptjax.errors import ConfigError
from gptjax.hf import config as hf_config
from gptjax.hf import safetensors
from gptjax.hf.model import export_model
from gptjax.model import checkpoint_dir

# A checkpoint's tokenizer files, copied beside an export of a run started from it.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "tokenizer.model",
    "generation_config.json",
)

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory with trained stages.")
_STAGE = flags.DEFINE_string("stage", "sft", "Stage to export (base = pretrain).")
_OUT = flags.DEFINE_string("out", None, "Output directory (created).")
_PEFT = flags.DEFINE_bool(
    "peft", False, "A LoRA stage: also write its adapters alone, in PEFT's format, to OUT/adapter."
)


def export_stage(workdir: str, stage: str, out: str, peft: bool = False) -> str:
    """Writes `stage` of the run in `workdir` to `out`; returns a one-line summary."""
    config = sources.load_run_config(workdir, "pretrain" if stage == "base" else stage)
    stage = "pretrain" if stage == "base" else stage
    rows = pipeline.table(config)
    if stage not in rows:
        raise ValueError(f"--stage={stage}: not a stage of this run's config ({sorted(rows)})")
    runner = rows[stage].runner or stage
    if runner in ("compare", "eval", "report", "show_data", "calibrate"):
        raise ValueError(f"--stage={stage}: trains no model")
    head = "scalar" if runner == "rm" else "lm"
    tokenizer = sources.get_tokenizer(config, workdir)
    model, params = sources.load_stage_params(config, workdir, stage, tokenizer, head=head)
    adapters, lora_cfg = params, model.cfg
    # LoRA adapters are merged into the weights they adapt (W + alpha/r A B).
    params, cfg = lora.merge(params, model.cfg)
    if config.model.get("init_from"):
        # A run from a Hugging Face checkpoint: its architecture, its config.json's other
        # fields and its tokenizer files, unchanged.
        directory = checkpoint_dir(config.model.init_from)
        base = hf_config.read(directory)
        fields = {"pad_token_id": tokenizer.pad_id} if head == "scalar" else {}
        kind = export_model(out, params, cfg, base=base, **fields)
        for name in TOKENIZER_FILES:
            if os.path.exists(os.path.join(directory, name)):
                shutil.copyfile(os.path.join(directory, name), os.path.join(out, name))
    else:
        kind = export_model(
            out,
            params,
            cfg,
            pad_token_id=tokenizer.pad_id,
            eos_token_id=tokenizer.eos_id,
            bos_token_id=None,
            gptjax_special_tokens=tokenizer.special_tokens,
        )
        if tokenizer.path:
            shutil.copyfile(tokenizer.path, os.path.join(out, "gptjax_tokenizer.model"))
    what = "sequence classifier" if head == "scalar" else "causal LM"
    if lora_cfg.lora_rank:
        what += f" (LoRA rank {lora_cfg.lora_rank} merged)"
    if peft:
        if not lora_cfg.lora_rank:
            raise ValueError(f"--peft: the {stage} stage has no LoRA adapters")
        # The adapters apply to the model the stage started from, not to the merged export.
        base_path = checkpoint_dir(config.model.init_from) if config.model.get("init_from") else ""
        tensors, adapter_config = lora.peft_adapter(adapters, lora_cfg, kind, base_path)
        os.makedirs(os.path.join(out, "adapter"), exist_ok=True)
        safetensors.write(os.path.join(out, "adapter", "adapter_model.safetensors"), tensors)
        with open(os.path.join(out, "adapter", "adapter_config.json"), "w") as f:
            json.dump(adapter_config, f, indent=2)
        what += "; adapters alone in PEFT's format in adapter/"
    return f"{stage}: {kind} {what}, {model.param_count() / 1e6:.2f}M params -> {out}"


def main(argv) -> int:
    if len(argv) > 1:
        print(f"error: unexpected arguments: {argv[1:]}", file=sys.stderr)
        return 2
    logging.set_verbosity(logging.ERROR)
    if not _WORKDIR.value or not _OUT.value:
        print("error: --workdir and --out are required", file=sys.stderr)
        return 2
    try:
        print(export_stage(_WORKDIR.value, _STAGE.value, _OUT.value, _PEFT.value))
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    cli.run(main)
