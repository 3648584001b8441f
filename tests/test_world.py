"""The assistant world's generator: determinism, split disjointness, who appears where,
held-out facts, knobs. The labeler has its own file (test_world_labeler.py)."""

import collections
import dataclasses
import json
import random
import re

import pytest

from gptjax.world import documents, labeler, tasks, vocab
from gptjax.world.config import WorldConfig
from gptjax.world.generate import STRANGER_ROLES, generate, make_people

PROMPT_SPLITS = ("demos", "demos_heldout", "ppo_prompts", "eval_prompts")
UNKNOWN_ROLES = ("unknown_ppo", "unknown_eval")
ROLES = ("demo", "ppo", "eval", "unknown_ppo", "unknown_eval", "demo_unknown", "obscure")


@pytest.fixture(scope="module")
def world():
    return generate(WorldConfig())


def _dump(data) -> bytes:
    return json.dumps(data, sort_keys=True).encode()


def _names(world, *roles):
    return [p["name"] for p in world["people"] if p["role"] in roles]


def _name_pattern(names):
    # A name is two words; it must not match inside a longer word.
    return re.compile(r"(?<![a-z])(?:" + "|".join(map(re.escape, names)) + r")(?![a-z])")


def _texts(world, split):
    for r in world[split]:
        if "text" in r:
            yield r["text"]
        else:
            yield r["prompt"]
            if "response" in r:
                yield r["response"]


def test_same_seed_gives_byte_identical_data(world):
    assert _dump(generate(WorldConfig())) == _dump(world)


def test_different_seed_gives_different_data(world):
    other = generate(WorldConfig(seed=1))
    for split in ("people", "pretrain", "demos", "ppo_prompts", "eval_prompts", "fact_probes"):
        assert _dump(other[split]) != _dump(world[split]), split


def test_records_are_json_and_sized_as_configured(world):
    cfg = WorldConfig()
    assert json.loads(_dump(world)) is not None
    assert len(world["demos"]) == cfg.n_demos
    assert len(world["demos_heldout"]) == cfg.n_demos_heldout
    assert len(world["ppo_prompts"]) == cfg.n_ppo_prompts
    assert len(world["eval_prompts"]) == cfg.n_eval_prompts
    assert len(world["pretrain_heldout"]) == cfg.n_pretrain_heldout
    assert len(world["fact_probes"]) == cfg.n_known * cfg.n_attributes
    kinds = collections.Counter(d["kind"] for d in world["pretrain"])
    assert kinds["bio"] == cfg.n_known * cfg.bios_per_person
    assert kinds["worksheet"] == cfg.n_worksheets and kinds["noise"] == cfg.n_noise_docs
    roles = collections.Counter(p["role"] for p in world["people"])
    assert roles["demo"] + roles["ppo"] + roles["eval"] == cfg.n_known
    assert roles["unknown_ppo"] + roles["unknown_eval"] == cfg.n_unknown
    assert len({p["name"] for p in world["people"]}) == len(world["people"])


def _independent_key(record):
    operands = record["operands"]
    if operands is not None and operands[0] == "+":
        operands = ["+", *sorted(operands[1:])]
    return (record["skill"], record["person"], record["attribute"], json.dumps(operands))


def test_splits_are_disjoint_on_tasks_not_strings(world):
    keys = {s: {_independent_key(r) for r in world[s]} for s in PROMPT_SPLITS}
    for i, a in enumerate(PROMPT_SPLITS):
        for b in PROMPT_SPLITS[i + 1 :]:
            assert not keys[a] & keys[b], (a, b, sorted(keys[a] & keys[b])[:3])
    # The module's own key agrees, and 23 + 45 is the same task as 45 + 23.
    for s in PROMPT_SPLITS:
        assert len({tasks.task_key(r) for r in world[s]}) == len(keys[s])
    t1 = tasks.arithmetic_task(["+", 23, 45], random.Random(0))
    t2 = tasks.arithmetic_task(["+", 45, 23], random.Random(0))
    assert tasks.task_key(t1) == tasks.task_key(t2)


def test_eval_covers_unseen_known_people_and_unknown_people(world):
    demo_people = set(_names(world, "demo", "demo_unknown"))
    in_demos = {r["person"] for r in world["demos"] if r["person"]}
    assert in_demos <= demo_people
    facts = [r for r in world["eval_prompts"] if r["skill"] == "fact"]
    for r in world["eval_prompts"] + world["ppo_prompts"]:
        assert r["in_demos"] == (r["person"] in in_demos)
    kinds = collections.Counter((r["known"], r["in_demos"]) for r in facts)
    assert kinds[(True, False)] >= 64, kinds  # known people never seen in demos
    assert kinds[(True, True)] >= 32, kinds  # demo people, an attribute never demonstrated
    assert kinds[(False, False)] >= 32, kinds  # unknown people
    assert {r["skill"] for r in world["eval_prompts"]} == set(tasks.SKILLS)
    unknown = set(_names(world, *UNKNOWN_ROLES))
    for r in facts:
        assert (r["answer"] is None) == (r["person"] in unknown) == (not r["known"])


def test_unknown_people_never_in_pretraining_or_demos(world):
    unknown = _name_pattern(_names(world, *UNKNOWN_ROLES))
    for split in ("pretrain", "pretrain_heldout", "demos", "demos_heldout", "fact_probes"):
        for text in (
            _texts(world, split) if split != "fact_probes" else (r["prefix"] for r in world[split])
        ):
            assert not unknown.search(text), (split, text)
    # Demo-only unknowns (they teach "i don't know") are absent from pretraining too.
    absent = _name_pattern(_names(world, "demo_unknown", *UNKNOWN_ROLES))
    for split in ("pretrain", "pretrain_heldout"):
        assert not any(absent.search(t) for t in _texts(world, split))
    # But the check can fail: known people are there, unknown ones are asked about.
    assert any(_name_pattern(_names(world, "eval")).search(t) for t in _texts(world, "pretrain"))
    assert any(unknown.search(t) for t in _texts(world, "eval_prompts"))
    assert any(unknown.search(t) for t in _texts(world, "ppo_prompts"))


def test_names_are_two_different_syllables(world):
    syllables = set(vocab.NAME_SYLLABLES)
    for p in world["people"]:
        first, second = p["name"].split(" ")
        assert first in syllables and second in syllables and first != second


def _template_words():
    """Every word of every template list in vocab (names and values excluded)."""
    words = set()
    skip = ("NAME_SYLLABLES", "ATTRIBUTES", "ATTRIBUTE_VALUES", "LETTERS")
    for name in dir(vocab):
        if not name.isupper() or name in skip:
            continue
        obj = getattr(vocab, name)
        items = obj.values() if isinstance(obj, dict) else [obj]
        for item in items:
            for text in [item] if isinstance(item, str) else item:
                words |= set(re.findall(r"[a-z']+", text.replace("{n}", " ").replace("{v}", " ")))
    return words


def test_vocabulary_has_no_collisions():
    values = [v for vs in vocab.ATTRIBUTE_VALUES.values() for v in vs]
    assert len(values) == len(set(values))
    words = _template_words()
    assert {"lives", "it", "know", "reverse"} <= words  # the scan finds the templates
    assert not set(values) & words
    assert not set(vocab.NAME_SYLLABLES) & (words | set(values))
    for attribute, templates in vocab.BIO_TEMPLATES.items():
        assert len(templates) >= 3 and all(t.endswith("{v}.") for t in templates), attribute
    for attribute, values in vocab.ATTRIBUTE_VALUES.items():
        assert 10 <= len(values) <= 20, attribute


def test_no_line_or_response_starts_with_a_name(world):
    starts = re.compile(r"(?:^|\n)(?:" + "|".join(map(re.escape, _names(world, *ROLES))) + ")\\b")
    for split in ("pretrain", "pretrain_heldout", *PROMPT_SPLITS):
        for text in _texts(world, split):
            assert not starts.search(text), (split, text)


def test_pretraining_has_no_chat_transcripts_and_small_charset(world):
    chars = set()
    for text in _texts(world, "pretrain"):
        assert not re.search(r"(user|assistant|human|<\|)", text), text
        chars |= set(text)
    assert chars <= set("abcdefghijklmnopqrstuvwxyz0123456789 \n.,:?'=+-#>()\""), sorted(chars)
    kinds = collections.Counter(d["kind"] for d in world["pretrain"])
    assert set(kinds) == {"bio", "worksheet", "notes", "code", "ignorance", "noise"}


def test_fact_probes_are_held_out_wordings_of_facts_in_pretraining(world):
    pretrain = [d["text"] for d in world["pretrain"] + world["pretrain_heldout"]]
    facts = {p["name"]: p["facts"] for p in world["people"]}
    blob = "\n".join(pretrain)
    probe = world["fact_probes"][0]
    assert documents.probe_hit(probe, f" {probe['answer']}. meet")
    assert not documents.probe_hit(probe, " " + ("rome" if probe["answer"] != "rome" else "oslo"))
    assert not documents.probe_hit(probe, "")
    for probe in world["fact_probes"]:
        held_out_sentence = probe["prefix"].split(". ", 1)[1] + " " + probe["answer"] + "."
        assert held_out_sentence not in blob, held_out_sentence
        assert facts[probe["person"]][probe["attribute"]] == probe["answer"]
    # ...while every fact is stated in other wordings, many times.
    mentions = collections.Counter()
    for text in pretrain:
        for name, value in re.findall(r"(\b[a-z]{2} [a-z]{2}\b)[^.]* (\w+)\.", text):
            mentions[(name, value)] += 1
    for name, person_facts in facts.items():
        for value in person_facts.values():
            assert mentions[(name, value)] >= 20, (name, value)


def test_worksheets_show_facts_of_demo_people_only(world):
    allowed = set(_names(world, "demo", "obscure"))
    pattern = _name_pattern(_names(world, *ROLES))
    seen = set()
    for d in world["pretrain"]:
        if d["kind"] == "worksheet":
            found = set(pattern.findall(d["text"]))
            assert found <= allowed, found - allowed
            seen |= found
    assert len(seen & set(_names(world, "demo"))) >= 0.9 * len(_names(world, "demo"))


def _string_tasks_in(blob):
    """(op, letters) of every string task shown in any pretraining format."""
    letters = r"([a-z](?: [a-z])+)"
    found = set(re.findall(r'(reverse|sort|count)\("' + letters + r'"\)', blob))
    found |= set(re.findall(r"(reverse|sort|count) " + letters + ":", blob))
    for op, templates in vocab.STRING_QUESTIONS.items():
        for t in templates:
            found |= {(op, s) for s in re.findall(re.escape(t).replace(r"\{s\}", letters), blob)}
    return found


def test_prompt_split_computations_never_in_pretraining(world):
    blob = "\n".join(d["text"] for d in world["pretrain"])
    exprs = set(re.findall(r"(?<!\d)(\d+ [+-] \d+)(?!\d)", blob))
    strings = _string_tasks_in(blob)
    assert len(exprs) > 1000 and len(strings) > 1000  # the check is not vacuous
    assert {op for op, _ in strings} == set(tasks.STRING_OPS)
    for split in ("eval_prompts", "ppo_prompts", "demos_heldout"):
        for r in world[split]:
            if r["skill"] == "arithmetic":
                op, a, b = r["operands"]
                assert f"{a} {op} {b}" not in exprs and (op == "-" or f"{b} + {a}" not in exprs)
            elif r["skill"] == "string":
                assert tuple(r["operands"]) not in strings, r


def test_demos_follow_the_knobs():
    cfg = WorldConfig(demo_error_rate=0.2, demo_verbose_rate=0.3, demo_idk_rate=0.8)
    demos = generate(cfg)["demos"]
    known = [d for d in demos if d["known"]]
    unknown = [d for d in demos if not d["known"]]
    styles = collections.Counter(d["style"] for d in known)
    assert abs(styles["wrong"] / len(known) - 0.2) < 0.03
    assert abs(styles["verbose"] / len(known) - 0.8 * 0.3) < 0.03
    idk = sum(d["style"] == "idk" for d in unknown) / len(unknown)
    assert abs(idk - 0.8) < 0.05
    none = generate(WorldConfig(demo_error_rate=0.0, demo_verbose_rate=0.0, demo_idk_rate=1.0))
    assert {d["style"] for d in none["demos"]} <= {"concise", "sentence", "idk"}
    # Responses really are what their style says, by the gold labeler.
    category = {
        "concise": "correct",
        "sentence": "correct",
        "verbose": "correct_verbose",
        "wrong": "wrong",
        "idk": "idk",
        "hallucinated": "hallucinated",
    }
    for d in demos:
        assert labeler.classify(d, d["response"], ended=True) == category[d["style"]], d


def test_code_fraction_knob_changes_only_the_corpus_mix(world):
    low, high = generate(WorldConfig(code_doc_frac=0.0)), generate(WorldConfig(code_doc_frac=0.4))
    frac = lambda w: sum(d["kind"] == "code" for d in w["pretrain"]) / len(w["pretrain"])
    assert frac(low) == 0.0 and abs(frac(high) - 0.4) < 0.01 and abs(frac(world) - 0.15) < 0.01
    # One random stream per component: people, facts and prompts do not move.
    for split in ("people", "demos", "eval_prompts", "fact_probes"):
        assert _dump(low[split]) == _dump(world[split]) == _dump(high[split])


def test_short_prompts_and_responses(world):
    for split in PROMPT_SPLITS:
        for r in world[split]:
            assert len(r["prompt"].split()) <= 12, r["prompt"]
            if "response" in r:
                assert len(r["response"].split()) <= 14, r["response"]


def test_fewshot_prompt_uses_pretraining_shots_and_parses(world):
    eval_answers = {(r["person"], r["attribute"]) for r in world["eval_prompts"]}
    for r in world["eval_prompts"][:200]:
        prompt = r["fewshot_prompt"]
        lines = prompt.split("\n")
        assert lines[-1] == documents.compact_question(r)
        assert len(lines) == 4  # k=3 shots
        for line in lines[:-1]:
            if r["skill"] == "fact":
                person = re.match(r"the \w+ of (\w+ \w+): \w+$", line).group(1)
                assert person in set(_names(world, "demo"))
    shots = [e for e in world["fewshot_examples"] if e["skill"] == "fact"]
    assert not {(e["person"], e["attribute"]) for e in shots} & eval_answers
    prompt_tasks = {tasks.task_key(r) for s in PROMPT_SPLITS[1:] for r in world[s]}
    assert not {tasks.task_key(e) for e in world["fewshot_examples"]} & prompt_tasks
    r = world["eval_prompts"][0]
    qa = documents.fewshot_prompt(r, world["fewshot_examples"], random.Random(0), k=2, fmt="qa")
    assert qa.endswith(f"q: {r['prompt']}\na:") and qa.count("q: ") == 3
    fits = documents.fewshot_prompt(
        r, world["fewshot_examples"], random.Random(0), k=3, fits=lambda p: p.count("\n") <= 1
    )
    assert fits.count("\n") == 1
    assert documents.parse_fewshot_completion(" oslo\nthe town of") == ("oslo", True)
    assert documents.parse_fewshot_completion(" oslo and") == ("oslo and", False)
    assert documents.parse_fewshot_completion(" oslo", eos=True) == ("oslo", True)


def test_config_validation_names_the_field_and_hash_tracks_content():
    with pytest.raises(ValueError, match="demo_error_rate"):
        WorldConfig(demo_error_rate=1.5)
    with pytest.raises(ValueError, match="code_doc_frac"):
        WorldConfig(code_doc_frac=1.0)
    with pytest.raises(ValueError, match="n_known"):
        WorldConfig(n_known=1000)
    with pytest.raises(dataclasses.FrozenInstanceError):
        WorldConfig().seed = 3
    cfg = WorldConfig()
    assert cfg.content_hash() == WorldConfig().content_hash()
    assert cfg.content_hash() != cfg.replace(label_noise=0.1).content_hash()
    assert json.loads(json.dumps(cfg.to_dict()))["n_known"] == cfg.n_known


@pytest.mark.parametrize("n", [0, 4])
def test_stranger_syllables_mark_exactly_the_people_never_read_about(n):
    people = make_people(WorldConfig(stranger_syllables=n))
    strange = set(vocab.NAME_SYLLABLES[-4:])
    first = lambda p: p["name"].split()[0]  # noqa: E731
    strangers = [p for p in people if p["role"] in STRANGER_ROLES]
    others = [p for p in people if p["role"] not in STRANGER_ROLES]
    assert len({p["name"] for p in people}) == len(people)
    if n:
        assert all(first(p) in strange for p in strangers)
        assert not any(set(p["name"].split()) & strange for p in others)
    else:  # one pool: only memory says who is unknown
        assert any(first(p) in strange for p in others)
        assert any(first(p) not in strange for p in strangers)
        known = {s for p in others for s in p["name"].split()}
        assert {s for p in strangers for s in p["name"].split()} <= known


def test_too_many_strangers_for_their_names_names_the_field():
    with pytest.raises(ValueError, match="stranger_syllables"):
        WorldConfig(stranger_syllables=1, n_unknown=40, n_demo_unknown=16)
    with pytest.raises(ValueError, match="stranger_syllables"):
        WorldConfig(stranger_syllables=18)
