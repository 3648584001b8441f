"""The one evaluator: every model answers the same held-out prompts under one protocol,
and reward functions and models score every reply. Generic: any prompt records, any
metrics; the built-in world plugs in its exact gold labeler and its few-shot prompt mode
(gptjax/world/evaluation.py).

Protocol (fixed, so numbers are comparable across models and runs):
  - greedy: one reply per prompt;
  - sample: `samples` replies per prompt at temperature 1, with fixed per-reply seeds;
  - replies stop at EOS or after `max_new_tokens`; a reply without EOS is "unterminated".
Prompt modes (`PromptMode`): CHAT (the chat template; SFT/RLHF models and base
zero-shot), or another way of prompting, e.g. the world's few-shot worksheets.

Metrics, their 95% bootstrap intervals over prompts and the tables: gptjax/eval_stats.py.

Beyond the gold labeler's verdicts, replies can be scored by models (`score_replies`,
teacher-forced, one compiled program per shape): the RM's reward at the reply's last
token, a model's log-probability of the reply and its per-token entropy. A policy's KL to
the reference (SFT) model, KL(pi || pi_sft) per sequence (the quantity PPO's penalty
controls), is `kl_to_reference`: the full-vocabulary KL at each token along the policy's
own samples, summed per reply, one estimator for every policy (best-of-n, which has no
token distribution, gets its exact KL over a pool of SFT samples instead).
`compare_to` adds win rates against a reference model's replies to the same prompts and
seeds, under any judges (e.g. the RM's reward, the world's gold score; a tie counts one
half). Diversity is measured within a
prompt's temperature-1 samples: distinct-n (unique n-grams / n-grams, Li et al. 2016)
and the share of unique replies.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from gptjax import eval_stats, losses, reward_model, sampling, sharding
from gptjax.data import chat
from gptjax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Protocol:
    max_new_tokens: int = 16
    samples: int = 4  # temperature-1 replies per prompt
    temperature: float = 1.0
    seed: int = 1234
    batch_size: int = 64
    bootstrap: int = 1000


@dataclasses.dataclass(frozen=True)
class Reply:
    index: int  # into the records
    sample: int
    text: str
    ended: bool
    n_tokens: int
    # The reply as chat-template ids (ending with EOS if it ended), for model scoring.
    ids: tuple[int, ...] = ()
    # Model-based scores of this reply, filled by score_replies / compare_to:
    # rm_reward, logp, logp_ref, entropy, win_gold, win_rm.
    extra: Mapping[str, float] = dataclasses.field(default_factory=dict)
    # Tool calls made while sampling it: (call text, result text, valid) each.
    calls: tuple = ()


@dataclasses.dataclass(frozen=True)
class PromptMode:
    """How a record is put to a model and how its generated ids become a reply.

    prompt_ids(record, tokenizer) -> ids; decode(ids, tokenizer) -> (reply text, ended,
    reply length in tokens, the reply as chat-template ids for model scoring).
    """

    name: str
    prompt_ids: Callable
    decode: Callable


def chat_prompt_ids(record: dict, tokenizer) -> list[int]:
    """The record's turns up to its last user message (a demonstration's reply is not part
    of the prompt), in the chat template."""
    return chat.render_prompt(chat.question_turns(record), tokenizer)


def _decode_chat(ids: list[int], tokenizer) -> tuple[str, bool, int, tuple[int, ...]]:
    text, ended = chat.decode_reply(ids, tokenizer)
    return text, ended, len(ids), tuple(ids)


CHAT = PromptMode("chat", chat_prompt_ids, _decode_chat)


def on_rows(params, *arrays_B):
    """The batch's arrays with their rows split over the data-parallel axes of the mesh
    that `params` live on, so each device decodes or scores its share of the rows (given
    as host arrays, they would be computed whole on every device). Unchanged where the
    params are on one device or the mesh's data-parallel size does not divide the rows."""
    placement = getattr(jax.tree.leaves(params)[0], "sharding", None)
    # Across hosts every process holds the whole batch: it stays replicated there.
    if isinstance(placement, jax.sharding.NamedSharding) and placement.is_fully_addressable:
        mesh = placement.mesh
        n = sharding.data_parallel_size(mesh)
        if n > 1 and arrays_B[0].shape[0] % n == 0:
            return jax.device_put(arrays_B, sharding.batch_sharding(mesh))
    return arrays_B


def generate_replies(
    model,
    params,
    tokenizer,
    records: Sequence[dict],
    *,
    mode: PromptMode,
    temperature: float,
    samples: int,
    protocol: Protocol,
    seed_offset: int = 0,
    toolbox=None,
    tool_tokens=None,
) -> list[Reply]:
    """Replies for every (record, sample); one compiled program for all batches.

    seed_offset shifts every sampling seed (best-of-n draws its n candidates with
    offsets 0..n-1; offset 0 is the protocol's own draws). toolbox (gptjax/tools.py) and
    tool_tokens (gptjax/tool_sampling.py ToolTokens): replies may call tools, answered as
    they are sampled; without them a call is just text.
    """
    prompts = [mode.prompt_ids(r, tokenizer) for r in records]
    p = max(len(x) for x in prompts)
    n = min(protocol.max_new_tokens, model.cfg.max_len - p)
    if n < 1:
        raise ConfigError(
            "model.max_len",
            f"{model.cfg.max_len} leaves no room to answer the longest prompt ({p} tokens)",
        )
    jobs = [(i, j) for i in range(len(records)) for j in range(samples)]
    bs = protocol.batch_size
    # A prompt's samples share one prefill (sampling.generate's `samples`: its G rows are
    # prompt-major, as `jobs` is) where they fill whole batches; tool calls need the rows.
    group = samples if toolbox is None and bs % samples == 0 else 1
    replies = []
    for start in range(0, len(jobs), bs):
        chunk = jobs[start : start + bs]
        rows = [prompts[i] for i, _ in chunk[::group]]
        rows += [[tokenizer.eos_id]] * (bs // group - len(rows))
        tokens, mask = sampling.left_pad(rows)
        tokens = np.pad(tokens, ((0, 0), (p - tokens.shape[1], 0)))
        mask = np.pad(mask, ((0, 0), (p - mask.shape[1], 0)))
        seeds = np.array(
            [protocol.seed + 7919 * i + j + 104729 * seed_offset for i, j in chunk]
            + [0] * (bs - len(chunk)),
            np.int32,
        )
        args = (model, params, tokens, mask, seeds)
        kw = dict(max_new_tokens=n, eos_id=tokenizer.eos_id, temperature=temperature)
        calls = [()] * bs
        if toolbox is None:
            rows = on_rows(params, tokens, mask, seeds)
            out, _, out_mask = sampling.generate(model, params, *rows, **kw, samples=group)
        else:  # a host loop between segments: the rows stay whole
            from gptjax.tool_sampling import generate_with_tools

            got = generate_with_tools(
                *args, **kw, tokenizer=tokenizer, toolbox=toolbox, spec=tool_tokens
            )
            out, out_mask, calls = got["tokens"], got["mask"], got["calls"]
        out, out_mask = np.asarray(out), np.asarray(out_mask)
        for k, (i, j) in enumerate(chunk):
            ids = out[k][out_mask[k] > 0].tolist()
            replies.append(Reply(i, j, *mode.decode(ids, tokenizer), calls=tuple(calls[k])))
    return replies


@functools.partial(jax.jit, static_argnames=("model", "temperature"))
def _teacher_forced(model, params, tokens_BxT, lengths_B, reply_start_B, temperature=1.0):
    """Per row: (log p of the reply, summed entropy over its tokens, reply tokens) for an
    LM head (of its distribution at `temperature`), or the value at the last token for a
    scalar head."""
    t = tokens_BxT.shape[1]
    col = jnp.arange(t)[None, :]
    seg_BxT = (col < lengths_B[:, None]).astype(jnp.int32)
    out = model.apply(params, tokens_BxT, seg_BxT, col * seg_BxT)
    if model.cfg.head == "scalar":
        return reward_model.reward_at_last_token(out, jnp.maximum(lengths_B - 1, 0))
    # Target t is predicted from logits t-1 (losses.token_logprobs' convention).
    target = ((col >= reply_start_B[:, None]) & (col < lengths_B[:, None]))[:, 1:]
    logits = out[:, :-1] if temperature == 1.0 else out[:, :-1] / temperature
    logp, entropy = losses.reply_logprobs(logits, tokens_BxT[:, 1:], target)
    return (
        jnp.sum(logp * target, axis=1),
        jnp.sum(entropy * target, axis=1),
        jnp.sum(target, axis=1),
    )


@functools.partial(jax.jit, static_argnames=("model", "ref_model", "temperature"))
def _teacher_forced_pair(
    model, params, ref_model, ref_params, tokens_BxT, lengths_B, reply_start_B, temperature
):
    """Per row, sums over the reply's tokens from one forward of the policy (at
    `temperature`) and one of its reference (at 1): the policy's log p and entropy, the
    token count, the reference's log p and entropy, and KL(policy ‖ reference) over the full
    vocabulary (losses.token_kl). ref_model None: the reference is the policy's own model
    at temperature 1 (a tempered variant against itself), one forward."""
    t = tokens_BxT.shape[1]
    col = jnp.arange(t)[None, :]
    seg_BxT = (col < lengths_B[:, None]).astype(jnp.int32)
    logits = model.apply(params, tokens_BxT, seg_BxT, col * seg_BxT)[:, :-1]
    if ref_model is None:
        ref_logits = logits
    else:
        ref_logits = ref_model.apply(ref_params, tokens_BxT, seg_BxT, col * seg_BxT)[:, :-1]
    target = ((col >= reply_start_B[:, None]) & (col < lengths_B[:, None]))[:, 1:]
    tempered = logits if temperature == 1.0 else logits / temperature
    logp, entropy = losses.reply_logprobs(tempered, tokens_BxT[:, 1:], target)
    ref_logp, ref_entropy = losses.reply_logprobs(ref_logits, tokens_BxT[:, 1:], target)
    kl = losses.token_kl(tempered, ref_logits)
    return tuple(
        jnp.sum(x * target, axis=1) for x in (logp, entropy, target, ref_logp, ref_entropy, kl)
    )


def score_with_reference(
    model,
    params,
    ref_model,
    ref_params,
    tokenizer,
    records: Sequence[dict],
    replies: Sequence[Reply],
    protocol,
    temperature: float = 1.0,
) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray], np.ndarray]:
    """A policy and its reference over chat replies in one teacher-forced pass:
    ((log p, mean entropy) under the policy at `temperature`, (log p, mean entropy) under
    the reference at 1 — each as score_replies gives it —, [N] KL(policy ‖ reference) of
    each reply's sequence). The KL is the full-vocabulary KL at each reply token, summed:
    on replies sampled from the policy its mean estimates the sequence KL without bias,
    with less variance than the summed log-ratio. ref_model None: the reference is `model`
    itself at temperature 1 (one forward)."""

    def pair(*batch):
        return _teacher_forced_pair(model, params, ref_model, ref_params, *batch, temperature)

    logp, ent, count, ref_logp, ref_ent, kl = _per_reply(
        pair, params, model, tokenizer, records, replies, protocol, outputs=6
    )
    count = np.maximum(count, 1)
    return (logp, ent / count), (ref_logp, ref_ent / count), kl


def kl_to_reference(
    model,
    params,
    ref_model,
    ref_params,
    tokenizer,
    records: Sequence[dict],
    replies: Sequence[Reply],
    protocol,
    temperature: float = 1.0,
) -> np.ndarray:
    """[N] KL(policy ‖ reference) of each reply's sequence (policy at `temperature`, the
    one a tempered variant sampled from; reference at 1): score_with_reference's KL."""
    return score_with_reference(
        model, params, ref_model, ref_params, tokenizer, records, replies, protocol, temperature
    )[2]


def _per_reply(fn, params, model, tokenizer, records, replies, protocol, outputs: int,
               max_len: int | None = None) -> list[np.ndarray]:  # fmt: skip
    """`outputs` [N] arrays, one value per reply, from fn(tokens_BxT, lengths_B,
    reply_starts_B) -> `outputs` [B] arrays (one array: a tuple of one) over teacher-forced
    chat rows (prompt + reply) of protocol.batch_size, as score_replies describes.

    Each distinct row (prompt + reply ids) is computed once: a prompt's temperature-1
    samples often repeat a reply (BUILD.md, Benchmarks). A row's
    values do not depend on its batch's other rows, so this changes no value. All batches
    share one width, the longest row's rounded up to a multiple of 16 (at most max_len), so
    the many scoring calls of an evaluation (each variant x protocol x scorer) share a
    handful of compiled programs; a row's values do depend on the width, in the last bits."""
    limit = model.cfg.max_len if max_len is None else min(max_len, model.cfg.max_len)
    index: dict[tuple[tuple[int, ...], int], int] = {}
    which = []
    for r in replies:
        p, y = chat_prompt_ids(records[r.index], tokenizer), list(r.ids) or [tokenizer.eos_id]
        ids = (p + y)[-limit:]
        which.append(index.setdefault((tuple(ids), max(len(ids) - len(y), 0)), len(index)))
    rows = list(index)
    width = max((len(ids) for ids, _ in rows), default=1)
    width = max(width, min(-(-width // 16) * 16, model.cfg.max_len))
    bs = protocol.batch_size
    outs = []
    for start in range(0, len(rows), bs):  # the last batch padded with (EOS, EOS) rows
        chunk = rows[start : start + bs]
        chunk += [((tokenizer.eos_id, tokenizer.eos_id), 1)] * (bs - len(chunk))
        tokens = np.zeros((bs, width), np.int32)
        for k, (ids, _) in enumerate(chunk):
            tokens[k, : len(ids)] = ids
        lengths = np.array([len(ids) for ids, _ in chunk], np.int32)
        starts = np.array([s for _, s in chunk], np.int32)
        out = jax.device_get(fn(*on_rows(params, tokens, lengths, starts)))
        outs.append(out if isinstance(out, tuple) else (out,))
    if not outs:
        return [np.zeros(0) for _ in range(outputs)]
    which = np.array(which, np.int64)
    return [np.concatenate(x)[which] for x in zip(*outs)]


def score_replies(
    model,
    params,
    tokenizer,
    records: Sequence[dict],
    replies: Sequence[Reply],
    protocol,
    temperature: float = 1.0,
    max_len: int | None = None,
):
    """Teacher-forced scores of chat replies: [N] rewards for a scalar-head model, or
    ([N] reply log-prob, [N] mean per-token entropy) for an LM, of its distribution at
    `temperature` (the one a tempered variant sampled from).

    A prompt + reply longer than max_len (default the model's) keeps its end, as the RM's
    training rows do (gptjax/data/iterators.py comparison_example): the prompt loses its
    start first, and the reply's own start only if the reply alone is longer. Memory is
    bounded by batch x max_len whatever the longest record."""

    def forward(*batch):
        return _teacher_forced(model, params, *batch, temperature)

    scalar = model.cfg.head == "scalar"
    outputs = 1 if scalar else 3  # a reward, or (log p, entropy sum, token count)
    values = _per_reply(
        forward, params, model, tokenizer, records, replies, protocol, outputs, max_len
    )
    if scalar:
        return values[0]
    logp, ent, count = values
    return logp, ent / np.maximum(count, 1)


def per_token(logp_sums, replies) -> np.ndarray:
    """[N] summed reply log-probs (score_replies' first output) as means per reply token
    (its EOS included; an empty reply is scored as its EOS alone)."""
    return np.asarray(logp_sums) / np.array([max(len(r.ids), 1) for r in replies])


def mean_logprobs(
    model, params, tokenizer, records, replies, protocol, max_len: int | None = None
) -> np.ndarray:
    """[N] each chat reply's mean per-token log-prob (its EOS included) under an LM, rows
    truncated to max_len as score_replies does."""
    logp, _ = score_replies(model, params, tokenizer, records, replies, protocol, max_len=max_len)
    return per_token(logp, replies)


def uses_reference(rm_params) -> bool:
    """Whether an RM reads the SFT model's log-probs (gptjax/reward_model.py)."""
    return float(rm_params["score_logp"]) != 0.0


def rm_rewards(rm, tokenizer, records, replies, protocol, ref_logp=None) -> np.ndarray:
    """[N] RM rewards of chat replies, as PPO sees them: the scalar head, plus score_logp x
    the reference feature (gptjax/reward_model.py) when the RM was trained with it.

    rm: (Model, params). ref_logp: [N] each reply's summed log-prob under the SFT model
    (score_replies' first output), needed when uses_reference(rm params).
    """
    values = score_replies(*rm, tokenizer, records, replies, protocol)
    return add_reference(values, rm[1], replies, ref_logp)


def add_reference(values, rm_params, replies, ref_logp=None) -> np.ndarray:
    """The scalar head's values of replies, plus the RM's reference term if it has one."""
    if not uses_reference(rm_params):
        return values
    if ref_logp is None:
        raise ValueError("this RM reads the SFT model's log-probs; none were given")
    score_logp = float(rm_params["score_logp"])
    return values + reward_model.reference_term(score_logp, per_token(ref_logp, replies))


def with_extra(replies: Sequence[Reply], name: str, values) -> list[Reply]:
    return [
        dataclasses.replace(r, extra={**r.extra, name: float(v)})
        for r, v in zip(replies, values, strict=True)
    ]


def _win(a: float, b: float) -> float:
    return 1.0 if a > b else 0.5 if a == b else 0.0


def rm_judge(record: dict, reply: Reply) -> float | None:
    """The RM's reward of a reply, if it was scored (with_extra "rm_reward")."""
    return reply.extra.get("rm_reward")


def compare_to(
    records: Sequence[dict],
    replies: Sequence[Reply],
    reference: Sequence[Reply],
    judges: Mapping[str, Callable[[dict, Reply], float | None]],
) -> list[Reply]:
    """Adds win_<judge> against the reference's reply to the same prompt and sample seed,
    for each judge that scores both replies (judge(record, reply) -> score or None), and
    length_diff, the reply's length minus the reference's in tokens."""
    ref = {(r.index, r.sample): r for r in reference}
    out = []
    for r in replies:
        other = ref.get((r.index, r.sample))
        if other is None:
            out.append(r)
            continue
        rec, extra = records[r.index], dict(r.extra)
        extra["length_diff"] = float(r.n_tokens - other.n_tokens)  # for the LC win rate
        for name, judge in judges.items():
            a, b = judge(rec, r), judge(rec, other)
            if a is not None and b is not None:
                extra[f"win_{name}"] = _win(a, b)
        out.append(dataclasses.replace(r, extra=extra))
    return out


def best_of_n(candidates: Sequence[Sequence[Reply]]) -> list[Reply]:
    """For each (prompt, sample), the candidate with the highest RM reward (Stiennon et al.
    2020; Nakano et al. 2021). candidates[m] are the m-th draws, aligned, with rm_reward."""
    out = []
    for draws in zip(*candidates, strict=True):
        best = max(draws, key=lambda r: r.extra["rm_reward"])
        out.append(dataclasses.replace(best, sample=draws[0].sample))
    return out


def best_of_n_kl(n: int) -> float:
    """KL(best-of-n || base) = log n - (n - 1) / n, the analytic value used for best-of-n
    in Stiennon et al. 2020 and Gao et al. 2022 (exact for distinct samples)."""
    return float(np.log(n) - (n - 1) / n)


def evaluate(
    model,
    params,
    tokenizer,
    records: Sequence[dict],
    metrics: Mapping,
    protocol: Protocol = Protocol(),
    mode: PromptMode = CHAT,
) -> dict:
    """{"greedy": metrics, "sample": metrics, "replies": {...}} for one model."""
    records = list(records)
    result = {}
    for name, temperature, samples in (
        ("greedy", 0.0, 1),
        ("sample", protocol.temperature, protocol.samples),
    ):
        replies = generate_replies(
            model,
            params,
            tokenizer,
            records,
            mode=mode,
            temperature=temperature,
            samples=samples,
            protocol=protocol,
        )
        result[name] = eval_stats.summarize(records, replies, metrics, protocol.bootstrap)
        result.setdefault("replies", {})[name] = replies
    return result
