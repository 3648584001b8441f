"""TFDS builders writing array_record, read back with random access and no TensorFlow.

Every record is stored as the JSON text of a normalised record (see `formats`) in one
`tfds.features.Text` field: variable-length lists and nested messages round-trip without
a feature spec per format, and the reader is the same for all of them.

TFDS caches prepared data by builder name, config name and version only, so a config
carries a hash of everything that determines its content (file bytes, format version,
the generator's settings) in its *name*: change a file or a size and it is a new config,
prepared afresh in its own directory `data_dir/<builder>/<name>-<hash>/<version>`.

Without TensorFlow: build with `file_format="array_record"`, read with
`builder.as_data_source(split)` (or `tfds.data_source(name, builder_kwargs=
{"file_format": "array_record"})`, which only picks array_record by itself when given no
data_dir). TFDS cannot write an empty split, so one is an error here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from gptjax.data import formats

# Bump when a parser's output changes, so every prepared local dataset is rebuilt.
FORMAT_VERSION = 1
_LOCAL_KINDS = ("text", "lines", "jsonl", "demos", "comparisons")


@dataclasses.dataclass
class RecordsConfig(tfds.core.BuilderConfig):
    """A builder config whose name ends with the hash of its content."""

    kind: str = ""
    paths: tuple[str, ...] = ()
    content_hash: str = ""
    # Only for `GptjaxRecords`: returns {split: records}. Not in the repr TFDS logs.
    make_records: Callable[[], Mapping[str, Iterable[Mapping]]] | None = dataclasses.field(
        default=None, repr=False, compare=False
    )


class _JsonRecordsBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIG_CLS = RecordsConfig

    def _info(self) -> tfds.core.DatasetInfo:
        # disable_shuffling keeps records in source order, so record i is line i's record.
        return tfds.core.DatasetInfo(
            builder=self,
            description=self.__doc__,
            features=tfds.features.FeaturesDict({"json": tfds.features.Text()}),
            disable_shuffling=True,
        )

    def _split_records(self) -> Mapping[str, Iterable[Mapping]]:
        raise NotImplementedError

    def _split_generators(self, dl_manager):
        del dl_manager  # Everything is local.
        return {
            split: self._generate_examples(split, records)
            for split, records in self._split_records().items()
        }

    def _generate_examples(self, split, records):
        n = -1
        for n, record in enumerate(records):
            yield n, {"json": json.dumps(record, ensure_ascii=False, sort_keys=True)}
        if n < 0:
            raise ValueError(
                f"split {split!r} of {self.name}/{self.builder_config.name} has no records"
            )

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls):
        # TFDS only uses this to find a download-checksums file, and for a class in a
        # package it resolves it through `importlib_resources`, which tfds 4.9.10 does not
        # install on Python >= 3.9 (tensorflow/datasets#11212). Nothing is downloaded here.
        return None

    # TFDS prints these to stdout; library code stays quiet.
    def _log_download_bytes(self) -> None:
        pass

    def _log_download_done(self) -> None:
        pass


class _LocalFilesBuilder(_JsonRecordsBuilder, skip_registration=True):
    def _split_records(self):
        cfg = self.builder_config
        reader = formats.READERS[cfg.kind]
        return {"train": (r for path in cfg.paths for r in reader(path))}


class GptjaxText(_LocalFilesBuilder):
    """Users' pretraining text: `{"text"}` per paragraph, line or JSONL record."""


class GptjaxDemos(_LocalFilesBuilder):
    """Users' demonstrations, normalised to `{"messages": [...]}`."""


class GptjaxComparisons(_LocalFilesBuilder):
    """Users' comparisons, normalised to `{"prompt", "messages", "responses", "ranks"}`."""


class GptjaxRecords(_JsonRecordsBuilder):
    """JSON-able records produced by a Python callable (e.g. the generated world)."""

    def _split_records(self):
        return self.builder_config.make_records()


_BUILDERS = {
    "text": GptjaxText,
    "lines": GptjaxText,
    "jsonl": GptjaxText,
    "demos": GptjaxDemos,
    "comparisons": GptjaxComparisons,
}


class JsonSource(Sequence):
    """Random access to a prepared split, decoding each record's JSON."""

    def __init__(self, data_source):
        self._source = data_source

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict:
        if not -len(self) <= index < len(self):
            raise IndexError(index)
        return json.loads(self._source[index % len(self)]["json"])

    def __getitems__(self, indices: Sequence[int]) -> list[dict]:
        """Many records in one read: ~4x faster than one at a time (ArrayRecord)."""
        return [json.loads(r["json"]) for r in self._source.__getitems__(list(indices))]


class TfdsSource(Sequence):
    """Random access to a registered TFDS dataset, bytes decoded to str."""

    def __init__(self, data_source):
        self._source = data_source

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict:
        if not -len(self) <= index < len(self):
            raise IndexError(index)
        return {k: _plain(v) for k, v in self._source[index % len(self)].items()}

    def __getitems__(self, indices: Sequence[int]) -> list[dict]:
        records = self._source.__getitems__(list(indices))
        return [{k: _plain(v) for k, v in r.items()} for r in records]


def _plain(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, np.ndarray) and value.ndim == 0:
        value = value.item()
        return value.decode("utf-8") if isinstance(value, bytes) else value
    if isinstance(value, np.generic):
        return value.item()
    return value


@contextlib.contextmanager
def _no_progress_bar():
    """TFDS's progress bar is a global switch; turn it off here and restore it after."""
    tqdm_utils = tfds.core.utils.tqdm_utils
    was_active = getattr(tqdm_utils, "_active", True)
    tfds.display_progress_bar(False)
    try:
        yield
    finally:
        tfds.display_progress_bar(was_active)


def _prepare(builder: _JsonRecordsBuilder) -> _JsonRecordsBuilder:
    with _no_progress_bar():
        builder.download_and_prepare(file_format="array_record")
    return builder


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9_]+", "_", text.lower()).strip("_")[:40] or "data"


def _file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def local_files(path: str) -> list[str]:
    """A file, or the sorted non-hidden files of a directory (one level)."""
    path = os.path.abspath(os.path.expanduser(path))
    if os.path.isdir(path):
        files = sorted(
            os.path.join(path, f)
            for f in os.listdir(path)
            if not f.startswith(".") and os.path.isfile(os.path.join(path, f))
        )
        if not files:
            raise FileNotFoundError(f"no files in directory {path}")
        return files
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such data file: {path}")
    return [path]


def local_builder(kind: str, path: str, data_dir: str) -> _JsonRecordsBuilder:
    """The (prepared) builder of a local file or directory of one format."""
    if kind not in _LOCAL_KINDS:
        raise ValueError(f"unknown local data kind {kind!r}; expected one of {_LOCAL_KINDS}")
    paths = local_files(path)
    content = {
        "format_version": FORMAT_VERSION,
        "kind": kind,
        # File bytes decide the content; the directory they sit in does not.
        "files": [[os.path.basename(p), _file_sha256(p)] for p in paths],
    }
    content_hash = content_sha256(content)
    name = f"{kind}_{_slug(os.path.basename(path.rstrip('/')))}-{content_hash[:16]}"
    config = RecordsConfig(name=name, kind=kind, paths=tuple(paths), content_hash=content_hash)
    return _prepare(_BUILDERS[kind](config=config, data_dir=data_dir, file_format="array_record"))


def content_sha256(content: Mapping) -> str:
    """Hash of a JSON-able description of everything that determines a dataset."""
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def build_records(
    name: str,
    make_records: Callable[[], Mapping[str, Iterable[Mapping]]],
    content: Mapping,
    data_dir: str,
) -> dict[str, JsonSource]:
    """Prepares (once per `content`) the records `make_records()` returns, per split.

    `content` must hold everything that determines the records (generator version, seed,
    sizes, knobs): its hash names the config, so a change rebuilds and an unchanged one
    reuses the prepared files without calling `make_records`.
    """
    content_hash = content_sha256({"format_version": FORMAT_VERSION, "content": content})
    config = RecordsConfig(
        name=f"{_slug(name)}-{content_hash[:16]}",
        kind="records",
        content_hash=content_hash,
        make_records=make_records,
    )
    builder = _prepare(GptjaxRecords(config=config, data_dir=data_dir, file_format="array_record"))
    return {split: JsonSource(builder.as_data_source(split)) for split in builder.info.splits}


def parse_spec(spec: str) -> tuple[str, str]:
    """ "kind:path" -> (kind, path); the kind is one of the local kinds or `tfds`."""
    kind, sep, rest = spec.partition(":")
    if not sep or not rest or kind not in (*_LOCAL_KINDS, "tfds"):
        raise ValueError(
            f"bad data spec {spec!r}: expected KIND:PATH with KIND in "
            f"{(*_LOCAL_KINDS, 'tfds')}, e.g. 'text:/data/corpus.txt' or 'tfds:tiny_shakespeare'"
        )
    return kind, rest


def load_split(spec: str, split: str, data_dir: str, download: bool = True) -> Sequence[dict]:
    """A random-access sequence of records for `spec` (see `parse_spec`) and `split`.

    Local files are one `train` split; hold out a slice with TFDS split syntax, e.g.
    `train[:99%]` / `train[99%:]`. `tfds:NAME` (e.g. `tfds:tiny_shakespeare`, `tfds:lm1b`,
    `tfds:c4/en`) reads a registered TFDS dataset, downloading and preparing it as
    array_record in `data_dir` on first use; that needs network and, for builders that
    use it while preparing, TensorFlow (`pip install gptjax[tfds-prepare]`).
    """
    kind, target = parse_spec(spec)
    if kind == "tfds":
        with _no_progress_bar():
            source = tfds.data_source(
                target,
                split=split,
                data_dir=data_dir,
                download=download,
                builder_kwargs={"file_format": "array_record"},
            )
        return TfdsSource(source)
    return JsonSource(local_builder(kind, target, data_dir).as_data_source(split))
