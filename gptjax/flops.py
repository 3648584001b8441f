"""FLOP counts, one convention for the benchmark's MFU and the AOT table's projections.

Analytic (the model's work, whatever the program does):
  training      6·N + 12·L·T·d per token: forward + backward of the matmuls (2·N per
                token forward, twice that backward) plus attention scores and values
                (2·L·T·d forward per token for each of QK^T and AV, ×3 with backward);
  forward only  2·N + 4·L·S·d per token over S keys (the sampler attends over its whole
                cache, prompt + reply, every token).
  N counts the params that multiply activations (`matmul_params`): lookup-only tables
  (learned positions; the embedding unless tied as the LM head's unembedding) are left
  out, as in PaLM's MFU (Chowdhery et al. 2022, app. B).
Program: `matmul_flops` counts 2·M·N·K of every dot_general of a traced step (scan bodies
× their length, while-loop bodies × a trip count, remat recomputation included): what
the compiled program does, which the analytic count does not see.
"""

from __future__ import annotations

import math

from gptjax.model import Model


def _subjaxprs(params):
    for v in params.values():
        for x in v if isinstance(v, (tuple, list)) else (v,):
            if hasattr(x, "eqns"):
                yield x
            elif hasattr(getattr(x, "jaxpr", None), "eqns"):
                yield x.jaxpr


def matmul_flops(jaxpr, while_trips: int = 1) -> float:
    """2·M·N·K of every dot_general in `jaxpr`: scan bodies x length, while-loop bodies x
    while_trips (an upper bound: the sampler's loop may stop early), the costliest branch
    of a cond."""
    total = 0.0
    for eqn in getattr(jaxpr, "eqns", None) or jaxpr.jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            (_, rhs_contract), (_, rhs_batch) = eqn.params["dimension_numbers"]
            lhs, rhs = eqn.invars[0].aval.shape, eqn.invars[1].aval.shape
            free = [d for i, d in enumerate(rhs) if i not in rhs_contract and i not in rhs_batch]
            total += 2.0 * math.prod(lhs) * math.prod(free)
        elif name == "cond":
            total += max(matmul_flops(b, while_trips) for b in eqn.params["branches"])
        elif name == "scan":
            total += eqn.params["length"] * matmul_flops(eqn.params["jaxpr"], while_trips)
        elif name == "while":
            total += while_trips * matmul_flops(eqn.params["body_jaxpr"], while_trips)
        else:
            total += sum(matmul_flops(j, while_trips) for j in _subjaxprs(eqn.params))
    return total


def matmul_params(model: Model) -> int:
    """Params that multiply activations: lookup-only tables (positions; the embedding
    unless tied as the unembedding of an LM head) are left out."""
    cfg, p = model.cfg, model.abstract_params
    n = model.param_count()
    if "pos_embed" in p:
        n -= math.prod(p["pos_embed"].shape)
    if not (cfg.head == "lm" and cfg.tie_embeddings):
        n -= math.prod(p["embed"].shape)
    return n


def train_flops(model: Model, rows: int, seq: int) -> float:
    c = model.cfg
    return rows * seq * (6 * matmul_params(model) + 12 * c.n_layers * seq * c.d_model)


def forward_flops(model: Model, rows: int, seq: int, keys: int | None = None) -> float:
    c = model.cfg
    return rows * seq * (2 * matmul_params(model) + 4 * c.n_layers * (keys or seq) * c.d_model)


def train_flops_per_token(model: Model, seq: int) -> float:
    """Training FLOPs per token of rows of `seq` tokens (the benchmark's MFU numerator)."""
    return train_flops(model, 1, seq) / seq
