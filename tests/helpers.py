"""Tiny shapes shared by the tests (T <= 32, <= 2 layers, small vocab)."""

import numpy as np

from gptjax.model import ModelConfig

TINY = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_len=32)


def tiny_model_config(**overrides) -> ModelConfig:
    return ModelConfig(**{**TINY, **overrides})


def lm_batch(tokens_BxT, segment_ids_BxT=None, positions_BxT=None, loss_mask_BxT=None):
    """A batch dict in the format every train step takes (see gptjax/data)."""
    tokens = np.asarray(tokens_BxT, np.int32)
    seg = np.ones_like(tokens) if segment_ids_BxT is None else np.asarray(segment_ids_BxT, np.int32)
    if positions_BxT is None:
        positions_BxT = np.broadcast_to(np.arange(tokens.shape[1], dtype=np.int32), tokens.shape)
    mask = (seg != 0).astype(np.float32) if loss_mask_BxT is None else loss_mask_BxT
    return {
        "tokens": tokens,
        "segment_ids": seg,
        "positions": np.asarray(positions_BxT, np.int32),
        "loss_mask": np.asarray(mask, np.float32),
    }


def random_batch(rng: np.random.Generator, b: int, t: int, vocab: int):
    return lm_batch(rng.integers(3, vocab, size=(b, t)))
