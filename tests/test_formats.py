"""Local file parsers: every supported format normalises; malformed input names path:line."""

import json

import pytest

from gptjax.data import formats


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return str(path)


def turns(*contents):
    roles = ["user", "assistant"]
    return [{"role": roles[k % 2], "content": c} for k, c in enumerate(contents)]


def test_text_paragraphs_and_lines(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("first doc\n  keeps its indent\n\n\n  \nsecond doc  \nüñï\n\nthird")
    assert [r["text"] for r in formats.read_text(str(path))] == [
        "first doc\n  keeps its indent",
        "second doc  \nüñï",
        "third",
    ]
    assert [r["text"] for r in formats.read_lines(str(path))] == [
        "first doc",
        "  keeps its indent",
        "second doc  ",
        "üñï",
        "third",
    ]


def test_jsonl_text(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [{"text": "a\nb", "id": 1}, {"text": " c "}])
    assert list(formats.read_jsonl_text(path)) == [{"text": "a\nb"}, {"text": " c "}]


def test_demonstration_formats_normalise_to_messages(tmp_path):
    records = [
        {"instruction": "Add.", "input": "2 and 3", "output": "5"},
        {"instruction": "Say hi.", "input": "", "output": "hi"},
        {"messages": turns("q1", "a1", "q2", "a2")},
        {
            "conversations": [
                {"from": "system", "value": "Be brief."},
                {"from": "human", "value": "q"},
                {"from": "gpt", "value": "a"},
            ]
        },
        {"prompt": "p", "response": "r"},
        {"prompt": "p", "completion": "c"},
    ]
    got = list(formats.read_demos(write_jsonl(tmp_path / "d.jsonl", records)))
    assert [g["messages"] for g in got] == [
        turns("Add.\n\n2 and 3", "5"),
        turns("Say hi.", "hi"),
        turns("q1", "a1", "q2", "a2"),
        turns("Be brief.\n\nq", "a"),
        turns("p", "r"),
        turns("p", "c"),
    ]


def test_alpaca_json_array(tmp_path):
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps([{"instruction": "i", "input": "", "output": "o"}] * 2, indent=2))
    assert [d["messages"] for d in formats.read_demos(str(path))] == [turns("i", "o")] * 2


def test_comparison_formats(tmp_path):
    hh_context = "\n\nHuman: hi\n\nAssistant: hello!\n\nHuman: what is 2+2?\n\nAssistant:"
    records = [
        {"prompt": "p", "chosen": "good", "rejected": "bad"},
        {"chosen": hh_context + " 4", "rejected": hh_context + " 5, I think"},
        {"prompt": hh_context, "chosen": " 4", "rejected": " 5"},
        {"prompt": "p", "responses": ["a", "b", "c"], "ranks": [1, 0, 1]},
    ]
    got = list(formats.read_comparisons(write_jsonl(tmp_path / "c.jsonl", records)))
    hh_turns = turns("hi", "hello!", "what is 2+2?")
    assert got == [
        {"prompt": "p", "messages": turns("p"), "responses": ["good", "bad"], "ranks": [0, 1]},
        {
            "prompt": "what is 2+2?",
            "messages": hh_turns,
            "responses": ["4", "5, I think"],
            "ranks": [0, 1],
        },
        {
            "prompt": "what is 2+2?",
            "messages": hh_turns,
            "responses": [" 4", " 5"],
            "ranks": [0, 1],
        },
        {"prompt": "p", "messages": turns("p"), "responses": ["a", "b", "c"], "ranks": [1, 0, 1]},
    ]


GOOD_DEMO = {"prompt": "p", "response": "r"}
GOOD_PAIR = {"prompt": "p", "chosen": "c", "rejected": "r"}


@pytest.mark.parametrize(
    "reader, bad, reason",
    [
        (formats.read_demos, '{"prompt": "p", "response": ', "bad JSON"),
        (formats.read_demos, {"prompt": "p"}, "missing field 'response'"),
        (formats.read_demos, {"prompt": "p", "response": "  "}, "empty response"),
        (formats.read_demos, {"instruction": "i", "output": ""}, "empty response"),
        (formats.read_demos, {"messages": turns("q", "a", "q2")}, "last message"),
        (formats.read_demos, {"messages": turns("q", "")}, "empty response"),
        (formats.read_demos, {"text": "t"}, "missing field"),
        (formats.read_demos, [1, 2], "expected a JSON object"),
        (formats.read_comparisons, {"prompt": "p", "chosen": "c"}, "missing field"),
        (formats.read_comparisons, {"prompt": "p", "chosen": "c", "rejected": ""}, "empty"),
        (
            formats.read_comparisons,
            {"chosen": "\n\nHuman: a\n\nAssistant: x", "rejected": "\n\nHuman: b\n\nAssistant: y"},
            "differ",
        ),
        (
            formats.read_comparisons,
            {"chosen": "\n\nHuman: a\n\nAssistant: x", "rejected": "\n\nHuman: a\n\nAssistant: "},
            "empty rejected response",
        ),
        (formats.read_comparisons, {"chosen": "no transcript", "rejected": "x"}, "HH"),
        (
            formats.read_comparisons,
            {"prompt": "p", "responses": ["a", "b"], "ranks": [0, 0]},
            "tied",
        ),
        (formats.read_comparisons, {"prompt": "p", "responses": ["a", "b"]}, "ranks"),
        (
            formats.read_comparisons,
            {"prompt": "p", "responses": ["a", ""], "ranks": [0, 1]},
            "empty response 1",
        ),
        (formats.read_jsonl_text, {"txt": "x"}, "missing field 'text'"),
        (formats.read_jsonl_text, {"text": 3}, "must be a string"),
    ],
)
def test_malformed_record_names_path_and_line(tmp_path, reader, bad, reason):
    good = GOOD_PAIR if reader is formats.read_comparisons else GOOD_DEMO
    if reader is formats.read_jsonl_text:
        good = {"text": "fine"}
    bad_line = bad if isinstance(bad, str) else json.dumps(bad)
    path = tmp_path / "data.jsonl"
    path.write_text(f"{json.dumps(good)}\n\n{bad_line}\n{json.dumps(good)}\n")
    with pytest.raises(formats.FormatError) as info:
        list(reader(str(path)))
    message = str(info.value)
    assert message.startswith(f"{path}:3: "), message
    assert reason in message


def test_json_array_errors_name_the_line(tmp_path):
    path = tmp_path / "a.json"
    path.write_text('[\n  {"prompt": "p", "response": "r"},\n  {"prompt": "p"}\n]')
    with pytest.raises(formats.FormatError, match=rf"^{path}:3: missing field 'response'"):
        list(formats.read_demos(str(path)))
    path.write_text('[\n  {"prompt": "p", "response": "r"},\n  {"prompt": \n]')
    with pytest.raises(formats.FormatError, match=rf"^{path}:4: bad JSON"):
        list(formats.read_demos(str(path)))


def test_invalid_utf8_names_the_line(tmp_path):
    path = tmp_path / "c.txt"
    path.write_bytes(b"fine\nalso fine\nbroken \xff here\n")
    with pytest.raises(formats.FormatError, match=rf"^{path}:3: not valid UTF-8"):
        list(formats.read_text(str(path)))


def test_consecutive_turns_of_one_role_are_merged_not_dropped(tmp_path):
    hh = "\n\nHuman: hi\n\nHuman: are you there?\n\nAssistant: yes\n\nAssistant: hello"
    assert formats.parse_hh(hh) == [
        {"role": "user", "content": "hi\n\nare you there?"},
        {"role": "assistant", "content": "yes\n\nhello"},
    ]
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"chosen": hh, "rejected": hh.replace("hello", "bye")}) + "\n")
    (record,) = formats.read_comparisons(str(path))
    assert record["responses"][0] == "yes\n\nhello"
    demo = {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                         {"role": "assistant", "content": "c"}]}  # fmt: skip
    assert formats.normalize_demo(demo)["messages"][0] == {"role": "user", "content": "a\n\nb"}
