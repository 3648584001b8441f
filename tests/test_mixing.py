"""Mixed SFT batches: demonstration rows keep their reply-only mask, pretraining rows
train on every token, and the mixed position resumes each source exactly."""

import itertools
import json

import numpy as np
import pytest

from gptjax.data import chat, iterators
from gptjax.data import tokenizer as tok_lib
from gptjax.data.mixing import ConcatBatches

T = 16


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    texts = [f"doc {i}: the cat sat on mat {i * 7}.\nbye" for i in range(300)]
    return tok_lib.train_tokenizer(texts, tmp_path_factory.mktemp("tok") / "t.model", 300)


def make(tok):
    docs = [{"text": f"doc {i}: " + "the cat sat. " * (i % 9)} for i in range(37)]
    demos = [
        {"messages": chat.pair_messages(f"what is {i} + {i}?", f"{2 * i}.")} for i in range(23)
    ]
    return ConcatBatches(
        {
            "demos": iterators.sft_batches(
                demos, tok, batch_size=3, seq_len=T, seed=1, packed=True
            ),
            "pretrain": iterators.lm_batches(docs, tok, batch_size=1, seq_len=T, seed=2),
        }
    )


def test_rows_keep_their_source_masks(tok):
    batch = next(make(tok))
    assert batch["tokens"].shape == (4, T)
    demo_mask, ptx_mask = batch["loss_mask"][:3], batch["loss_mask"][3]
    # Demonstrations: loss on replies only, so some real tokens are unmasked.
    assert ((batch["segment_ids"][:3] > 0) & (demo_mask == 0)).any()
    # Pretraining text: loss on every real token.
    np.testing.assert_array_equal(ptx_mask, (batch["segment_ids"][3] > 0).astype(np.float32))


def test_resume_replays_both_sources(tok):
    reference = list(itertools.islice(make(tok), 12))
    interrupted = make(tok)
    list(itertools.islice(interrupted, 5))
    resumed = make(tok)
    resumed.set_state(json.loads(json.dumps(interrupted.get_state())))
    for want, got in zip(reference[5:], itertools.islice(resumed, 7)):
        for k in want:
            np.testing.assert_array_equal(want[k], got[k])


def test_a_position_without_a_source_is_refused(tok):
    with pytest.raises(ValueError, match="pretrain"):
        make(tok).set_state({"demos": make(tok).get_state()["demos"]})
