"""TFDS builders: prepare from local fixtures (array_record, no TF, no network), rebuild on
any content change, reuse when nothing changed."""

import json
import sys

import pytest

from experiments import sources
from gptjax.data import builders, formats


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def test_text_corpus_builders(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("doc one\n  indented\n\ndoc two ü\n")
    data_dir = str(tmp_path / "tfds")
    text = builders.load_split(f"text:{corpus}", "train", data_dir)
    assert list(text) == [{"text": "doc one\n  indented"}, {"text": "doc two ü"}]
    lines = builders.load_split(f"lines:{corpus}", "train", data_dir)
    assert [r["text"] for r in lines] == ["doc one", "  indented", "doc two ü"]
    jsonl = write_jsonl(tmp_path / "c.jsonl", [{"text": f"doc {i}"} for i in range(10)])
    source = builders.load_split(f"jsonl:{jsonl}", "train", data_dir)
    assert len(source) == 10 and source[3] == {"text": "doc 3"} and source[-1] == {"text": "doc 9"}
    with pytest.raises(IndexError):
        source[10]
    head = builders.load_split(f"jsonl:{jsonl}", "train[:80%]", data_dir)
    tail = builders.load_split(f"jsonl:{jsonl}", "train[80%:]", data_dir)
    assert list(head) + list(tail) == list(source) and len(tail) == 2
    # A batched read is the same records as one at a time, in the order asked.
    assert source.__getitems__([7, 0, 3]) == [source[7], source[0], source[3]]
    assert list(sources.texts(source, chunk=3)) == [f"doc {i}" for i in range(10)]
    window = sources._Slice(source, 2, 6)  # as the RM's and RL's prompt shares are read
    assert window.__getitems__([0, 3]) == [source[2], source[5]]
    assert list(sources.texts(window)) == [f"doc {i}" for i in range(2, 6)]
    assert list(sources.texts(source, limit_chars=11, chunk=4)) == ["doc 0", "doc 1", "doc 2"]
    assert "tensorflow" not in sys.modules


def test_demo_and_comparison_builders_match_the_parsers(tmp_path):
    demos = write_jsonl(
        tmp_path / "demos.jsonl",
        [
            {"instruction": "Add.", "input": "1 2", "output": "3"},
            {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
        ],
    )
    hh = "\n\nHuman: hi\n\nAssistant:"
    comparisons = write_jsonl(
        tmp_path / "cmp.jsonl",
        [
            {"chosen": hh + " hello", "rejected": hh + " go away"},
            {"prompt": "p", "responses": ["x", "y", "z"], "ranks": [2, 0, 1]},
        ],
    )
    data_dir = str(tmp_path / "tfds")
    got_demos = builders.load_split(f"demos:{demos}", "train", data_dir)
    assert list(got_demos) == list(formats.read_demos(str(demos)))
    assert got_demos[0]["messages"][0]["content"] == "Add.\n\n1 2"
    got_cmp = builders.load_split(f"comparisons:{comparisons}", "train", data_dir)
    assert list(got_cmp) == list(formats.read_comparisons(str(comparisons)))
    assert got_cmp[0]["responses"] == ["hello", "go away"] and got_cmp[1]["ranks"] == [2, 0, 1]


def test_changing_a_file_rebuilds_and_an_unchanged_one_is_reused(tmp_path):
    data_dir = tmp_path / "tfds"
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("old doc\n")
    assert list(builders.load_split(f"text:{corpus}", "train", str(data_dir))) == [
        {"text": "old doc"}
    ]
    corpus.write_text("new doc\n\nand another\n")
    assert [r["text"] for r in builders.load_split(f"text:{corpus}", "train", str(data_dir))] == [
        "new doc",
        "and another",
    ]
    prepared = sorted(p.name for p in (data_dir / "gptjax_text").iterdir())
    assert len(prepared) == 2
    builders.load_split(f"text:{corpus}", "train", str(data_dir))
    assert sorted(p.name for p in (data_dir / "gptjax_text").iterdir()) == prepared


def test_directory_of_files_is_one_dataset(tmp_path):
    folder = tmp_path / "shards"
    folder.mkdir()
    write_jsonl(folder / "b.jsonl", [{"text": "b"}])
    write_jsonl(folder / "a.jsonl", [{"text": "a1"}, {"text": "a2"}])
    (folder / ".hidden").write_text("ignored")
    source = builders.load_split(f"jsonl:{folder}", "train", str(tmp_path / "tfds"))
    assert [r["text"] for r in source] == ["a1", "a2", "b"]


def test_malformed_record_fails_with_path_and_line(tmp_path):
    demos = tmp_path / "demos.jsonl"
    demos.write_text('{"prompt": "p", "response": "r"}\n{"prompt": "p", "response": ""}\n')
    with pytest.raises(formats.FormatError, match=rf"^{demos}:2: empty response"):
        builders.load_split(f"demos:{demos}", "train", str(tmp_path / "tfds"))


def test_records_builder_rebuilds_on_content_change_only(tmp_path):
    calls = []

    def make(n):
        def records():
            calls.append(n)
            return {
                "train": ({"i": i, "words": ["a"] * i, "nested": {"x": "ü"}} for i in range(n)),
                "eval": [{"i": -1}],
            }

        return records

    data_dir = str(tmp_path / "tfds")
    first = builders.build_records("World v1", make(3), {"seed": 0, "n": 3}, data_dir)
    assert set(first) == {"train", "eval"}
    assert list(first["train"]) == [
        {"i": i, "words": ["a"] * i, "nested": {"x": "ü"}} for i in range(3)
    ]
    assert list(first["eval"]) == [{"i": -1}]
    again = builders.build_records("World v1", make(3), {"seed": 0, "n": 3}, data_dir)
    assert list(again["train"]) == list(first["train"]) and calls == [3]
    bigger = builders.build_records("World v1", make(5), {"seed": 0, "n": 5}, data_dir)
    assert len(bigger["train"]) == 5 and calls == [3, 5]


def test_empty_split_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="'eval'.*no records"):
        builders.build_records(
            "w", lambda: {"train": [{"a": 1}], "eval": []}, {"v": 1}, str(tmp_path / "tfds")
        )


def test_tfds_by_name_reads_a_prepared_dataset(tmp_path):
    # Offline stand-in for `tfds:tiny_shakespeare`: the same tfds.data_source path, pointed
    # at a dataset already prepared in data_dir, so nothing is downloaded.
    data_dir = str(tmp_path / "tfds")
    builders.build_records("named", lambda: {"train": [{"text": "to be"}]}, {"v": 1}, data_dir)
    (config,) = [p.name for p in (tmp_path / "tfds" / "gptjax_records").iterdir()]
    source = builders.load_split(f"tfds:gptjax_records/{config}", "train", data_dir)
    assert len(source) == 1 and json.loads(source[0]["json"]) == {"text": "to be"}
    assert source.__getitems__([0]) == [source[0]]


@pytest.mark.parametrize("spec", ["corpus.txt", "txt:/x", "text:", "tfds"])
def test_bad_specs(tmp_path, spec):
    with pytest.raises(ValueError, match="bad data spec"):
        builders.load_split(spec, "train", str(tmp_path))


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        builders.load_split(f"text:{tmp_path}/nope.txt", "train", str(tmp_path))
