"""Scoring comparison records with a reward model: every reply's reward, the reference
feature the RM reads (gptjax/reward_model.py), and the held-out metrics of the RM stage
(pairwise accuracy, margin, calibration, baselines; against the noiseless gold ranking
when the records carry one).

Records are the comparison format of gptjax/data/formats.py: a prompt's `responses`
with `ranks` (0 = best, equal = tie), optionally `ended` and `meta.gold_ranks`.
Shape legend: N records, K replies per record (padded to k_max).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import jax
import numpy as np

from gptjax import evaluate
from gptjax.data import chat
from gptjax.data.iterators import ComparisonBatches
from gptjax.model import Model


def with_ref_logp(
    sft: Model, sft_params, tokenizer, records: Sequence[dict], seq_len: int | None = None
) -> list[dict]:
    """records with "ref_logp": each reply's mean log-prob under the SFT model (with its
    EOS if it ended), the RM's reference feature (gptjax/reward_model.py), on the rows the
    RM trains on (prompt + reply cut to seq_len, keeping the end)."""
    replies = [
        evaluate.Reply(i, k, text, done, 0, tuple(chat.reply_ids(rec, k, tokenizer)))
        for i, rec in enumerate(records)
        for k, (text, done) in enumerate(
            zip(rec["responses"], rec.get("ended") or [True] * len(rec["responses"]))
        )
    ]
    protocol = evaluate.Protocol(batch_size=64)
    feature = evaluate.mean_logprobs(
        sft, sft_params, tokenizer, records, replies, protocol, max_len=seq_len
    )
    out, start = [], 0
    for rec in records:
        k = len(rec["responses"])
        out.append({**rec, "ref_logp": [float(x) for x in feature[start : start + k]]})
        start += k
    return out


def score(trainer, tokenizer, batch_kw: Mapping, params, records) -> np.ndarray:
    """rewards_NxK of every reply of `records` under an RM trainer's eval step, in batches
    laid out as its training batches (batch_kw: ComparisonBatches' keywords); padding
    slots hold garbage: mask them with `labels`' valid."""
    n, b = len(records), batch_kw["batch_size"]
    batches = ComparisonBatches(records, tokenizer, seed=0, shuffle=False, **batch_kw)
    out = [
        np.asarray(jax.device_get(trainer.eval_step(params, trainer.put_batch(next(batches)))))
        for _ in range(-(-n // b))
    ]
    return np.concatenate(out)[:n]


def labels(records, k_max: int, key: str | None = None):
    """(ranks_NxK, valid_NxK) of records' labels, or of meta[key] (e.g. gold_ranks)."""
    ranks = np.zeros((len(records), k_max), np.int32)
    valid = np.zeros((len(records), k_max), np.float32)
    for i, rec in enumerate(records):
        r = rec["ranks"] if key is None else rec["meta"][key]
        ranks[i, : len(r)], valid[i, : len(r)] = r, 1.0
    return ranks, valid


def shorter(reply: str) -> float:
    """The length baseline: a shorter reply is better."""
    return -len(reply)


def _reply_features(records, k_max: int, baselines) -> dict[str, np.ndarray]:
    """Each baseline's score of every reply."""
    out = {name: np.zeros((len(records), k_max)) for name in baselines}
    for i, rec in enumerate(records):
        for k, reply in enumerate(rec["responses"]):
            for name, fn in baselines.items():
                out[name][i, k] = fn(reply)
    return out


def rm_metrics(
    records, rewards_NxK, k_max: int, baselines: Mapping[str, Callable[[str], float]]
) -> dict:
    """Held-out metrics of the RM on `records` (labels = the records' ranks).

    accuracy: share of labelled pairs the RM orders like the label (ties wrong);
    margin: mean r_w − r_l over them. With the world's meta (gold_ranks):
    gold_accuracy: the same against the noiseless gold ranking (gold ties excluded);
    noise_ceiling: how often the noisy labels agree with gold on those pairs;
    max_accuracy: the label accuracy of a perfect gold ranker (gold ties count half),
    i.e. the most any RM can expect against these noisy labels.
    baselines: name -> score of a reply (e.g. `shorter`), scored on the same pairs, ties
    half.
    """
    ranks, valid = labels(records, k_max)
    acc, margin, n_pairs = pair_stats(rewards_NxK, ranks, valid)
    features = _reply_features(records, k_max, baselines)
    out = {
        "accuracy": acc,
        "margin": margin,
        "pairs": n_pairs,
        "baselines": {k: pair_stats(v, ranks, valid, 0.5)[0] for k, v in features.items()},
        "calibration": calibration_bins(rewards_NxK, ranks, valid),
    }
    if all("gold_ranks" in (rec.get("meta") or {}) for rec in records):
        gold, _ = labels(records, k_max, "gold_ranks")
        out["gold_accuracy"] = pair_stats(rewards_NxK, gold, valid)[0]
        out["noise_ceiling"] = pair_stats(-ranks, gold, valid, 0.5)[0]
        out["max_accuracy"] = pair_stats(-gold, ranks, valid, 0.5)[0]
        out["gold_baselines"] = {k: pair_stats(v, gold, valid, 0.5)[0] for k, v in features.items()}
    return out


def pair_stats(pred_NxK, ranks_NxK, valid_NxK, tie: float = 0.0):
    """(accuracy, mean margin, n pairs) of scores against ranks, over the pairs the ranks
    order (w ranked above l, both valid): accuracy = P(pred_w > pred_l), an equal pair
    counting `tie`. 0 for an RM (one that cannot tell two replies apart has not ranked
    them); 0.5 for baselines and label agreement, whose many ties score at chance."""
    pred, ranks, valid = map(np.asarray, (pred_NxK, ranks_NxK, valid_NxK))
    better = (
        (ranks[:, :, None] < ranks[:, None, :]) & (valid[:, :, None] > 0) & (valid[:, None, :] > 0)
    )
    diff = (pred[:, :, None] - pred[:, None, :])[better]
    if diff.size == 0:
        return float("nan"), float("nan"), 0
    return float(np.mean((diff > 0) + tie * (diff == 0))), float(diff.mean()), int(diff.size)


def calibration_bins(rewards_BxK, ranks_BxK, valid_BxK, n_bins: int = 10):
    """Predicted P(i beats j) = σ(r_i − r_j) vs the observed win rate, per bin.

    Uses every ordered pair of distinct ranks once per direction; returns a list of
    {"predicted", "observed", "n"} for non-empty bins.
    """
    r, ranks, valid = map(np.asarray, (rewards_BxK, ranks_BxK, valid_BxK))
    both = (
        (valid[:, :, None] > 0) & (valid[:, None, :] > 0) & (ranks[:, :, None] != ranks[:, None, :])
    )
    p = 1 / (1 + np.exp(-(r[:, :, None] - r[:, None, :])))[both]
    won = (ranks[:, :, None] < ranks[:, None, :])[both]
    edges = np.linspace(0, 1, n_bins + 1)
    out = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        sel = (p >= lo) & ((p < hi) | (hi == 1.0))
        if sel.any():
            out.append(
                {
                    "predicted": float(p[sel].mean()),
                    "observed": float(won[sel].mean()),
                    "n": int(sel.sum()),
                }
            )
    return out
