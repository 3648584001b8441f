"""Where every stage's data, tokenizer and model come from: the built-in world or the
user's files (README: Using your own data), the workdir's tokenizer, and the trained
params of the stages a stage reads. Errors name the config field or the file.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Collection, Sequence

import jax
import numpy as np

from experiments.rundir import initialize_distributed, make_mesh, process_0_first, stage_dir
from gptjax import checkpoint as ckpt_lib
from gptjax import config as config_lib
from gptjax import evaluate, lora, sharding, tools
from gptjax.data import builders, formats
from gptjax.data import tokenizer as tok_lib
from gptjax.data.iterators import read_many
from gptjax.errors import ConfigError
from gptjax.model import Model, ModelConfig, checkpoint_dir, from_pipeline
from gptjax.world import WorldConfig, generate

WORLD = "world"
FROM_COMPARE = "compare"  # data.comparisons: this workdir's compare stage
COMPARE_SPLITS = ("train", "heldout")


def data_dir(config, workdir: str) -> str:
    return config.data.data_dir or os.path.join(workdir, "data")


def world_config(config) -> WorldConfig:
    fields = config.world.to_dict()
    fields["skill_mix"] = tuple(fields["skill_mix"])
    fields["seed"] = config.seeds.world
    try:
        return config_lib.from_dict(WorldConfig, fields, "world")
    except ValueError as e:  # WorldConfig.__post_init__ names the field
        raise ConfigError("world", str(e)) from None


def world_data(config, workdir: str) -> dict[str, Sequence[dict]]:
    """The generated world as TFDS array_record splits (prepared once per content hash)."""
    cfg = world_config(config)
    initialize_distributed(config)
    return process_0_first(
        "world data",
        lambda: builders.build_records(
            "world",
            lambda: generate(cfg),
            {"world": cfg.to_dict(), "hash": cfg.content_hash()},
            data_dir(config, workdir),
        ),
    )


def world_prompt_split(config) -> int:
    """How many of the world's ppo_prompts (the first ones) are kept for comparisons: the
    compare stage samples from them, RL stages train on the others."""
    share = config.data.rm_prompt_share
    n = int(config.world.n_ppo_prompts)
    if not isinstance(share, int | float) or not 0 < share < 1:
        raise ConfigError("data.rm_prompt_share", f"must be in (0, 1), got {share!r}")
    n_rm = round(n * share)
    if not 0 < n_rm < n:
        raise ConfigError("data.rm_prompt_share", f"{share} of {n} prompts leaves a split empty")
    return n_rm


def world_prompts(config, workdir: str, role: str) -> Sequence[dict]:
    """The world's ppo_prompts for `role`: "compare" (the first world_prompt_split) or
    "rl" (the rest)."""
    prompts = world_data(config, workdir)["ppo_prompts"]
    n_rm = world_prompt_split(config)
    return _Slice(prompts, 0, n_rm) if role == "compare" else _Slice(prompts, n_rm, len(prompts))


class _Slice(Sequence):
    """A random-access slice of a random-access source, without reading it."""

    def __init__(self, source, start: int, stop: int):
        self._source, self._start, self._len = source, start, max(0, stop - start)

    def __len__(self):
        return self._len

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(self._len))]
        if not -self._len <= i < self._len:
            raise IndexError(i)
        return self._source[self._start + (i % self._len)]

    def __getitems__(self, indices):
        return read_many(self._source, [self._start + (i % self._len) for i in indices])


# data field -> the world's (train, held-out) splits of it
_WORLD_SPLITS = {"pretrain": ("pretrain", "pretrain_heldout"), "demos": ("demos", "demos_heldout")}


def _sources(config, workdir: str, field: str) -> tuple[Sequence, Sequence]:
    spec = config.data[field]
    if spec == WORLD:
        world = world_data(config, workdir)
        return tuple(world[split] for split in _WORLD_SPLITS[field])
    return split_user_file(
        f"data.{field}",
        spec,
        config.data[f"{field}_heldout_fraction"],
        data_dir(config, workdir),
        max_bad_fraction(config),
    )


def pretrain_sources(config, workdir: str) -> tuple[Sequence, Sequence]:
    """(train, held-out) pretraining documents from the world or the user's corpus."""
    return _sources(config, workdir, "pretrain")


def demo_sources(config, workdir: str) -> tuple[Sequence, Sequence]:
    """(train, held-out) demonstrations from the world or the user's file."""
    return _sources(config, workdir, "demos")


def max_bad_fraction(config) -> float:
    """data.max_bad_fraction: the share of malformed records of a user's file that are
    dropped (each reported) rather than failing; 0 (the default) = none."""
    value = config.data.get("max_bad_fraction", 0.0)
    if not isinstance(value, int | float) or not 0 <= value < 1:
        raise ConfigError("data.max_bad_fraction", f"must be in [0, 1), got {value!r}")
    return float(value)


def split_user_file(
    field: str, spec: str, heldout_fraction: float, ddir: str, max_bad_fraction: float = 0.0
):
    """(train, held-out) slices of a user's dataset; errors name the config field."""
    if not 0 < heldout_fraction < 1:
        raise ConfigError(f"{field}_heldout_fraction", f"must be in (0, 1), got {heldout_fraction}")
    pct = max(1, round(100 * heldout_fraction))

    def load():
        train = builders.load_split(spec, f"train[:{100 - pct}%]", ddir)
        return train, builders.load_split(spec, f"train[{100 - pct}%:]", ddir)

    try:
        with formats.drop_bad_records(max_bad_fraction) as dropped:
            train, heldout = process_0_first(field, load)
    except ValueError as e:
        raise ConfigError(field, str(e)) from None
    if dropped:
        print(
            f"{field}: dropped {len(dropped)} malformed records (data.max_bad_fraction="
            f"{max_bad_fraction}), the first: {dropped[0]}",
            file=sys.stderr,
        )
    if len(train) == 0 or len(heldout) == 0:
        raise ConfigError(
            field,
            f"{spec} has too few records to hold out {pct}% for "
            f"evaluation ({len(train)} train, {len(heldout)} held out)",
        )
    return train, heldout


def texts(source: Sequence, limit_chars: int = 20_000_000, chunk: int = 4096):
    """The source's texts in order, up to about limit_chars characters, read `chunk`
    records at a time (read_many)."""
    n = 0
    for start in range(0, len(source), chunk):
        for record in read_many(source, range(start, min(start + chunk, len(source)))):
            text = record["text"] if isinstance(record, dict) else str(record)
            yield text
            n += len(text)
            if n >= limit_chars:
                return


def get_tokenizer(config, workdir: str, corpus: Sequence | None = None) -> tok_lib.Tokenizer:
    """Loads config.tokenizer.path, or the workdir's, or trains one on the corpus (process 0
    first); every process of a multi-host run must end up with the same one."""
    initialize_distributed(config)
    tokenizer = process_0_first(
        "tokenizer", lambda: _load_or_train_tokenizer(config, workdir, corpus)
    )
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.assert_equal(
            np.frombuffer(bytes.fromhex(tokenizer.hash), np.uint8),
            f"processes loaded different tokenizers (this one: {tokenizer.hash[:12]})",
        )
    return tokenizer


_CHECKPOINT_TOKENIZERS: dict[str, object] = {}


def _load_or_train_tokenizer(config, workdir: str, corpus: Sequence | None):
    if config.model.get("init_from"):
        # The checkpoint's tokenizer and chat template (gptjax/hf/chat_template.py).
        from gptjax.hf.chat_template import load_chat_tokenizer

        directory = checkpoint_dir(config.model.init_from)
        if directory not in _CHECKPOINT_TOKENIZERS:
            tokenizer, notes = load_chat_tokenizer(directory)
            for note in notes:
                print(f"{directory}: {note}", flush=True)
            _CHECKPOINT_TOKENIZERS[directory] = tokenizer
        return _CHECKPOINT_TOKENIZERS[directory]
    if config.tokenizer.path:
        if not os.path.exists(config.tokenizer.path):
            raise ConfigError("tokenizer.path", f"no such file: {config.tokenizer.path}")
        return tok_lib.load_tokenizer(config.tokenizer.path)
    path = os.path.join(workdir, "tokenizer", "spm.model")
    if corpus is None:
        if not os.path.exists(path):
            raise FileNotFoundError(
                f"no tokenizer at {path}: run the pretrain stage first, "
                f"or set --config.tokenizer.path"
            )
        return tok_lib.load_tokenizer(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    # With tools (experiments/toolbox.py) the call and result markers are special tokens.
    has_tools = config.get("tools") is not None and tools.parse_names(config.tools.names)
    special = tok_lib.DEFAULT_SPECIAL_TOKENS + (tools.TOKENS if has_tools else ())
    return tok_lib.train_tokenizer(
        texts(corpus),
        path,
        config.tokenizer.vocab_size,
        model_type=config.tokenizer.model_type,
        special_tokens=special,
    )


def model_config(config, tokenizer: tok_lib.Tokenizer | None, head: str = "lm") -> ModelConfig:
    """The model section with the vocab resolved from the tokenizer (padded). tokenizer
    None (validation before one exists): the size it will be trained to."""
    return from_pipeline(config, None if tokenizer is None else tokenizer.vocab_size, head)


def load_stage_params(
    config,
    workdir: str,
    stage: str,
    tokenizer,
    head: str = "lm",
    directory: str | None = None,
    mesh=None,
):
    """(Model, params) of a stage's final checkpoint, sharded over `mesh` (default this
    run's).

    directory: an explicit checkpoint directory (another run's output); default
    `<workdir>/<stage>/checkpoints`.
    """
    cfg = model_config(config, tokenizer, head)
    if stage == "pretrain":
        cfg = lora.without_adapters(cfg)  # the base model never has LoRA adapters
    model = Model(cfg)
    mesh = make_mesh(config) if mesh is None else mesh
    shardings = sharding.param_shardings(mesh, model.logical_axes, model.abstract_params)
    if stage == "pretrain" and config.model.get("init_from"):
        # The base model is the Hugging Face checkpoint, read shard by shard onto the mesh.
        from gptjax.hf.model import load_params

        directory = checkpoint_dir(config.model.init_from)
        return model, load_params(directory, model.cfg, shardings)
    directory = directory or os.path.join(stage_dir(workdir, stage), "checkpoints")
    if not os.path.isdir(directory):
        raise FileNotFoundError(
            f"no {stage} checkpoints at {directory}: run --stages={stage} first (same --workdir)"
        )
    abstract = ckpt_lib.abstract_tree(model.abstract_params, shardings)
    # load_params refuses a checkpoint trained with another tokenizer.
    params, _, _ = ckpt_lib.load_params(directory, abstract, tokenizer_hash=tokenizer.hash)
    return model, params


def compare_paths(compare_dir: str) -> dict[str, str]:
    """The compare stage's output files, by split."""
    return {split: os.path.join(compare_dir, f"{split}.jsonl") for split in COMPARE_SPLITS}


def comparison_sources(config, workdir: str, compare_dir: str):
    """(train, held-out) comparison records: the compare stage's files or the user's."""
    spec = config.data.comparisons
    if spec == FROM_COMPARE:
        p = compare_paths(compare_dir)
        if not os.path.exists(p["train"]):
            raise FileNotFoundError(
                f"no comparisons at {p['train']}: run --stages=compare first (same "
                f"--workdir), or set --config.data.comparisons=comparisons:/path/file.jsonl"
            )
        return [list(formats.read_comparisons(p[s])) for s in COMPARE_SPLITS]
    if not spec.startswith("comparisons:"):
        raise ConfigError(
            "data.comparisons",
            f"expected {FROM_COMPARE!r} or comparisons:/path/file.jsonl, got {spec!r}",
        )
    return split_user_file(
        "data.comparisons",
        spec,
        config.data.comparisons_heldout_fraction,
        data_dir(config, workdir),
        max_bad_fraction(config),
    )


def comparison_splits(config, workdir: str, compare_dir: str, section, name: str):
    """(train, held-out, k_max) for a stage trained on comparisons (rm, dpo): both splits
    non-empty, and `<name>.k_max` (0: the data's largest list) holding every list."""
    train_src, heldout_src = comparison_sources(config, workdir, compare_dir)
    if len(train_src) == 0 or len(heldout_src) == 0:
        raise ConfigError(
            "data.comparisons", f"{len(train_src)} train / {len(heldout_src)} held-out comparisons"
        )
    k_data = max(len(s[i]["responses"]) for s in (train_src, heldout_src) for i in range(len(s)))
    k_max = section.k_max or k_data
    if k_max < k_data:
        raise ConfigError(f"{name}.k_max", f"{k_max} < {k_data} responses in a comparison")
    return train_src, heldout_src, k_max


def prompt_source(config, workdir: str, section, prefix: str):
    """An RL stage's prompts: the world's ppo_prompts or the prompt turns of a file."""
    spec = section.prompts
    if spec == WORLD:
        return world_prompts(config, workdir, "rl")
    if spec.startswith(REASON):
        return reason_prompts(config, workdir, spec, f"{prefix}.prompts")
    try:
        return builders.load_split(spec, "train", data_dir(config, workdir))
    except ValueError as e:
        raise ConfigError(f"{prefix}.prompts", str(e)) from None


REASON = "reason:"


def check_reason_spec(config, spec: str, field: str) -> str:
    """The mode of a `reason:MODE` prompts spec, checked, and the world has the tasks."""
    from gptjax.world import reasoning

    mode = spec[len(REASON) :]
    if mode not in reasoning.MODES:
        raise ConfigError(field, f"{spec!r}: the mode must be one of {', '.join(reasoning.MODES)}")
    if int(config.world.get("n_reason_prompts", 0)) <= 0:
        raise ConfigError(field, f"{spec!r} needs world.n_reason_prompts > 0")
    return mode


def reason_prompts(config, workdir: str, spec: str, field: str) -> Sequence[dict]:
    """The world's reason_ppo tasks asked in the spec's mode (gptjax/world/reasoning.py)."""
    from gptjax.world import reasoning

    mode = check_reason_spec(config, spec, field)
    tasks = world_data(config, workdir)["reason_ppo"]
    return _Mapped(tasks, lambda t: {**t, "prompt": reasoning.question(t, mode)})


class _Mapped(Sequence):
    """A random-access source with fn applied to each record as it is read."""

    def __init__(self, source, fn):
        self._source, self._fn = source, fn

    def __len__(self):
        return len(self._source)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return self._fn(self._source[i])


def check_user_data(config, workdir: str, datasets: Collection[str], section=None, name=""):
    """Reads every user file among `datasets` (pretrain, demos, comparisons, prompts) the
    way its stage will, so that a malformed record or a missing file is a ConfigError
    naming the field, the file and the line before any stage computes. The built-in
    world's data and the compare stage's comparisons are skipped (nothing for a user to
    get wrong); a file read here is prepared once and reused by its stage."""
    for field in ("pretrain", "demos"):
        if field in datasets and config.data[field] != WORLD:
            _sources(config, workdir, field)
    if "comparisons" in datasets and config.data.comparisons != FROM_COMPARE:
        comparison_sources(config, workdir, "")
    if "prompts" in datasets and section is not None and section.prompts != WORLD:
        if section.prompts.startswith(REASON):  # the world's: only the spec to check
            check_reason_spec(config, section.prompts, f"{name}.prompts")
        else:
            prompt_source(config, workdir, section, name)


def report_long_prompts(source, render, limit: int, field: str) -> int:
    """Counts prompts longer than `limit` tokens and says so before training: they are
    cut to their last `limit` tokens (the end of a chat prompt is the turn to answer),
    never a crash. Returns the count."""
    lengths = [len(render(source[i])) for i in range(len(source))]
    if not lengths:
        raise ConfigError(field.rsplit(".", 1)[0] + ".prompts", "the prompt dataset is empty")
    n_long = sum(n > limit for n in lengths)
    if n_long:
        print(
            f"{field}: {n_long} of {len(lengths)} prompts are longer than {limit} tokens "
            f"(longest {max(lengths)}); each keeps its last {limit} tokens",
            file=sys.stderr,
        )
    return n_long


def eval_records(config, workdir: str) -> list[dict]:
    """The evaluated prompts (the first eval.max_prompts of them): the world's held-out
    eval prompts, or a user's prompts file (eval.prompts)."""
    if config.eval.get("prompts", WORLD) != WORLD:
        src = prompt_source(config, workdir, config.eval, "eval")
        n = len(src) if not config.eval.max_prompts else min(config.eval.max_prompts, len(src))
        return [src[i] for i in range(n)]
    if config.data.pretrain != WORLD:
        raise ConfigError(
            "data.pretrain",
            "the gold evaluator scores the built-in world; it needs data.pretrain=world",
        )
    src = world_data(config, workdir)["eval_prompts"]
    n = len(src) if not config.eval.max_prompts else min(config.eval.max_prompts, len(src))
    return [src[i] for i in range(n)]


def protocol(config) -> evaluate.Protocol:
    """The evaluator's fixed protocol from the eval section."""
    e = config.eval
    return evaluate.Protocol(
        max_new_tokens=e.max_new_tokens,
        samples=e.samples,
        temperature=e.temperature,
        seed=e.seed,
        batch_size=e.batch_size,
        bootstrap=e.bootstrap,
    )


def fixed_batches(iterator, n: int) -> list[dict]:
    return [next(iterator) for _ in range(n)]


def load_run_config(workdir: str, stage: str = "pretrain"):
    """The config the workdir was trained with (saved with every checkpoint): `stage`'s,
    else SFT's (a run from a Hugging Face checkpoint has no pretrain stage)."""
    import json

    import ml_collections

    names = list(dict.fromkeys((stage, "pretrain", "sft")))
    for name in names:
        directory = os.path.join(stage_dir(workdir, name), "checkpoints")
        if not os.path.isdir(directory):
            continue
        ckpt = ckpt_lib.Checkpointer(directory, (), async_save=False)
        try:
            step = ckpt.latest_step()
            if step is not None:
                _, _, meta = ckpt.restore({}, step)
                return ml_collections.ConfigDict(json.loads(meta["config"]))
        finally:
            ckpt.close()
    others = [n for n in names if n != "pretrain"]
    raise FileNotFoundError(
        f"no pretrain checkpoint in {workdir} (nor {' or '.join(others)}: the run's config "
        "is saved with them)"
    )
