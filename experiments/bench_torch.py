"""PyTorch references for `python -m experiments.bench compare` (torch and transformers
come with the test extra; this module is imported only by that mode).

train: a nanoGPT-style GPT (Karpathy's model.py, rewritten for gptjax's shapes) with the
  same layout as the gptjax model it is compared with — pre-LN blocks, LayerNorm with
  bias, bias-free linear layers, tanh-GELU MLP, rotary or learned positions, tied
  embeddings — so the two have the same parameter count (asserted), trained with AdamW
  and gradient clipping on the same batch shape; eager mode, no torch.compile.
decode: Hugging Face `generate` with its KV cache, greedy, min_new_tokens ==
  max_new_tokens, on the gptjax model's own weights exported to the Hugging Face
  architecture that holds them exactly (gptjax/hf/model.py export_model).
"""

from __future__ import annotations

import statistics
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from gptjax.model import ModelConfig


def _rotate(x, cos, sin):
    """Rotary embedding on the last dim, half-split layout (GPT-NeoX's and gptjax's)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, hd = cfg.d_model, cfg.head_dim
        self.n_heads, self.head_dim = cfg.n_heads, hd
        self.attn_norm = nn.LayerNorm(d, eps=cfg.norm_eps)
        self.qkv = nn.Linear(d, 3 * cfg.n_heads * hd, bias=False)
        self.wo = nn.Linear(cfg.n_heads * hd, d, bias=False)
        self.mlp_norm = nn.LayerNorm(d, eps=cfg.norm_eps)
        self.w_up = nn.Linear(d, cfg.d_ff, bias=False)
        self.w_down = nn.Linear(cfg.d_ff, d, bias=False)

    def forward(self, x_BxTxD, rope):
        b, t, _ = x_BxTxD.shape
        qkv = self.qkv(self.attn_norm(x_BxTxD)).view(b, t, 3, self.n_heads, self.head_dim)
        q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))  # [B, H, T, hd]
        if rope is not None:
            q, k = _rotate(q, *rope), _rotate(k, *rope)
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x_BxTxD = x_BxTxD + self.wo(att.transpose(1, 2).reshape(b, t, -1))
        h = F.gelu(self.w_up(self.mlp_norm(x_BxTxD)), approximate="tanh")
        return x_BxTxD + self.w_down(h)


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_embed = (
            nn.Embedding(cfg.max_len, cfg.d_model) if cfg.positions == "learned" else None
        )
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.final_norm = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.rope_theta, self.head_dim = cfg.rope_theta, cfg.head_dim
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.normal_(p, std=cfg.init_std)

    def forward(self, tokens_BxT):
        t = tokens_BxT.shape[1]
        x = self.embed(tokens_BxT)
        rope = None
        if self.pos_embed is not None:
            x = x + self.pos_embed(torch.arange(t))
        else:
            inv = 1.0 / self.rope_theta ** (torch.arange(0, self.head_dim, 2) / self.head_dim)
            angles = torch.outer(torch.arange(t, dtype=torch.float32), inv)
            rope = (angles.cos(), angles.sin())
        for block in self.blocks:
            x = block(x, rope)
        return self.final_norm(x) @ self.embed.weight.T  # tied unembedding


def train_step(cfg: ModelConfig, batch: int, seq_len: int, lr: float, clip: float, threads: int):
    """(step(i), parameter count): step(i) runs one AdamW step with gradient clipping on
    the i-th of 4 batches of random tokens."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = GPT(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    rng = np.random.default_rng(0)
    tokens = torch.from_numpy(rng.integers(3, cfg.vocab_size, (4, batch, seq_len + 1)))

    def step(i):
        x, y = tokens[i % 4, :, :-1], tokens[i % 4, :, 1:]
        logits = model(x)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()

    return step, sum(p.numel() for p in model.parameters())


def train_tokens_per_s(
    cfg: ModelConfig,
    batch: int,
    seq_len: int,
    steps: int,
    lr: float,
    clip: float,
    threads: int,
    profile_steps: int = 0,
) -> dict:
    """Median tokens/s of `steps` train_step steps (after 3 warm-up steps) on random
    tokens; with profile_steps, "ops_ms": each aten op's self CPU ms per step over that
    many more steps under torch.profiler."""
    step, params = train_step(cfg, batch, seq_len, lr, clip, threads)
    times = []
    for i in range(steps + 3):
        t0 = time.perf_counter()
        step(i)
        times.append(time.perf_counter() - t0)
    step_s = statistics.median(times[3:])
    out = {"params": params, "step_ms": 1e3 * step_s, "tokens_per_s": batch * seq_len / step_s}
    if profile_steps:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for i in range(profile_steps):
                step(i)
        out["ops_ms"] = {
            e.key: e.self_cpu_time_total / 1e3 / profile_steps
            for e in prof.key_averages()
            if e.self_cpu_time_total > 0
        }
    return out


def hf_greedy(cfg: ModelConfig, params, prompts_BxP: np.ndarray, new_tokens: int, threads: int):
    """A function running Hugging Face greedy `generate` (KV cache) on `params` exported
    to its architecture; returns (generate(), the new tokens as numpy [B, new_tokens])."""
    from transformers import AutoModelForCausalLM

    from gptjax.hf.model import export_model

    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as directory:
        export_model(directory, params, cfg)
        hf = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    input_ids = torch.from_numpy(prompts_BxP.astype(np.int64))
    attention_mask = torch.ones_like(input_ids)
    p = input_ids.shape[1]

    @torch.inference_mode()
    def generate():
        out = hf.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            do_sample=False,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            use_cache=True,
            pad_token_id=0,
        )
        return out[:, p:].numpy()

    return generate


def median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)
