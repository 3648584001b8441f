"""lm_train_step really learns: a real margin below the text's unigram entropy."""

import functools

import jax
import numpy as np

from gptjax import sharding, train_steps
from gptjax.model import Model
from gptjax.optim import OptimConfig, make_optimizer
from gptjax.sharding import MeshConfig
from tests.helpers import lm_batch, tiny_model_config

WORDS = ["the", "cat", "dog", "sat", "ran", "on", "mat", "rug", "and", "then", "slept", "ate"]


def generated_text(rng: np.random.Generator, n_chars: int) -> str:
    # Word bigram model: each word has 2 likely successors, so characters are predictable
    # far beyond their unigram frequencies.
    succ = {w: rng.choice(len(WORDS), size=2, replace=False) for w in WORDS}
    words, w = [], "the"
    while sum(len(x) + 1 for x in words) < n_chars:
        words.append(w)
        w = WORDS[rng.choice(succ[w])]
    return " ".join(words)[:n_chars]


def unigram_entropy_nats(ids: np.ndarray) -> float:
    p = np.bincount(ids) / len(ids)
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def test_tiny_lm_beats_unigram_entropy_by_a_nat():
    rng = np.random.default_rng(0)
    text = generated_text(rng, 40_000)
    vocab = sorted(set(text))
    ids = np.array([vocab.index(c) + 3 for c in text], np.int32)  # 0-2 reserved (pad/eos/unk)
    train, heldout = ids[:32_000], ids[32_000:]
    h_unigram = unigram_entropy_nats(heldout)

    model = Model(tiny_model_config(vocab_size=32, max_len=32))
    optim = OptimConfig(lr=3e-3, warmup_steps=20)
    steps, b, t = 300, 16, 32
    tx, schedule = make_optimizer(optim, steps)
    mesh = sharding.make_mesh(MeshConfig(), devices=jax.devices()[:1])
    init, shardings = train_steps.jit_init(model, tx, mesh)
    state = init(jax.random.key(0))
    step = train_steps.jit_train_step(
        functools.partial(train_steps.lm_train_step, model=model, tx=tx, schedule=schedule),
        mesh,
        shardings,
    )
    for _ in range(steps):
        starts = rng.integers(0, len(train) - t, size=b)
        state, metrics = step(
            state, lm_batch(np.stack([train[s : s + t] for s in starts])), jax.random.key(1)
        )

    rows = heldout[: (len(heldout) // t) * t].reshape(-1, t)
    eval_step = jax.jit(functools.partial(train_steps.lm_eval_step, model=model))
    out = eval_step(state["params"], lm_batch(rows))
    heldout_loss = float(out["loss_sum"] / out["count"])
    assert heldout_loss < h_unigram - 1.0, (heldout_loss, h_unigram)
    assert float(metrics["accuracy"]) > 0.5
