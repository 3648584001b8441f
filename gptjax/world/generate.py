"""generate(cfg): the whole assistant world as JSON-able records, by split.

Splits (all lists of dicts; see tasks.py for the task fields):
- people: {"name", "role", "facts"}; role in demo / ppo / eval (known: facts in
  pretraining), unknown_ppo / unknown_eval (never in pretraining or demos),
  demo_unknown (never in pretraining; asked about in demos), obscure (pretraining only,
  in sentences admitting ignorance).
- pretrain: {"text", "kind"} documents (documents.py); pretrain_heldout: more of the
  same, none identical to a pretrain document, for the held-out LM loss.
- fact_probes: {"prefix", "answer", "person", "attribute", "in_demos"}: a held-out
  sentence form of every known fact (the fact is in pretraining in other wordings).
- demos, demos_heldout: tasks with the demonstrator's "response" and its "style"
  (concise / sentence / verbose / wrong / idk / hallucinated).
- ppo_prompts, eval_prompts: tasks with "in_demos" (the person appears in demos);
  eval prompts also carry "fewshot_prompt" (k=3, compact worksheet format).
- fewshot_examples: shots for documents.fewshot_prompt, from the pretraining
  distribution: the worksheet facts, and arithmetic/string tasks outside every split.

Disjointness, on tasks.task_key (skill, person, attribute, operands; a + b == b + a): eval,
PPO, demos and demos_heldout share no task. Facts: demo people's facts go to demos
(and worksheets) except one attribute per demo person, kept for eval (in_demos=True),
and a heldout_fact_frac share kept for demos_heldout; PPO and eval people's facts are
in bios only. Arithmetic and string tasks of eval, PPO and demos_heldout never appear
in pretraining, so eval measures computing, not recall.
"""

from __future__ import annotations

import itertools
import random

from gptjax import retrieval
from gptjax.world import documents, reasoning, tasks, vocab
from gptjax.world.config import WorldConfig

KNOWN_ROLES = ("demo", "ppo", "eval")
STRANGER_ROLES = ("unknown_eval", "unknown_ppo", "demo_unknown")  # never in the corpus
SPLITS = (
    "people",
    "pretrain",
    "pretrain_heldout",
    "fact_probes",
    "demos",
    "demos_heldout",
    "ppo_prompts",
    "eval_prompts",
    "fewshot_examples",
)
# Only when WorldConfig.n_reason_eval / n_reason_prompts > 0.
REASON_SPLITS = ("reason_eval", "reason_ppo")


def _rng(cfg: WorldConfig, stream: str) -> random.Random:
    # A string seed is hashed with SHA-512 by `random`: stable across runs and platforms.
    return random.Random(f"gptjax-world/{cfg.seed}/{stream}")


def make_people(cfg: WorldConfig) -> list[dict]:
    """Names, roles, facts, and the bio template reserved for each fact's probe."""
    rng = _rng(cfg, "people")
    names = [f"{a} {b}" for a, b in itertools.product(vocab.NAME_SYLLABLES, repeat=2) if a != b]
    n_demo = round(cfg.n_known * cfg.demo_people_frac)
    n_eval = round(cfg.n_known * cfg.eval_people_frac)
    n_eval_unknown = round(cfg.n_unknown * cfg.eval_unknown_frac)
    roles = (
        ["demo"] * n_demo
        + ["eval"] * n_eval
        + ["ppo"] * (cfg.n_known - n_demo - n_eval)
        + ["unknown_eval"] * n_eval_unknown
        + ["unknown_ppo"] * (cfg.n_unknown - n_eval_unknown)
        + ["demo_unknown"] * cfg.n_demo_unknown
        + ["obscure"] * cfg.n_obscure
    )
    if cfg.stranger_syllables:
        strange = vocab.NAME_SYLLABLES[-cfg.stranger_syllables :]
        pools = {True: [], False: []}
        for n in names:
            first, second = n.split()
            if first in strange:
                pools[True].append(n)
            elif second not in strange:
                pools[False].append(n)
        stranger = [r in STRANGER_ROLES for r in roles]
        drawn = {k: iter(rng.sample(pools[k], stranger.count(k))) for k in pools}
        chosen = [next(drawn[k]) for k in stranger]
    else:
        chosen = rng.sample(names, len(roles))
    people = []
    for name, role in zip(chosen, roles):
        facts, reserved = {}, {}
        if role in KNOWN_ROLES:
            facts = {a: rng.choice(vocab.ATTRIBUTE_VALUES[a]) for a in cfg.attributes}
            reserved = {a: rng.randrange(len(vocab.BIO_TEMPLATES[a])) for a in cfg.attributes}
        people.append({"name": name, "role": role, "facts": facts, "reserved": reserved})
    return people


# Which pool of (person, attribute, value) triples a role's facts go to; demo people's
# are split three ways in _fact_pools.
_ROLE_POOL = {
    "ppo": "ppo",
    "eval": "eval",
    "unknown_ppo": "ppo_unk",
    "unknown_eval": "eval_unk",
    "demo_unknown": "demos_unk",
}


def _fact_pools(cfg: WorldConfig, people: list[dict]) -> dict[str, list[tuple]]:
    """(person, attribute, value or None) triples for each split, known and unknown."""
    rng = _rng(cfg, "fact-pools")
    pools = {k: [] for k in ("demos", "heldout", "demos_unk", "heldout_unk")}
    pools.update({k: [] for k in _ROLE_POOL.values()})
    for p in people:
        triples = [(p["name"], a, p["facts"].get(a)) for a in cfg.attributes]
        if p["role"] == "demo":
            # One attribute per demo person is never demonstrated: eval asks it.
            kept = rng.randrange(len(triples)) if len(triples) > 1 else None
            for i, t in enumerate(triples):
                pools["eval" if i == kept else "demos"].append(t)
        elif p["role"] in _ROLE_POOL:
            pools[_ROLE_POOL[p["role"]]] += triples
    for pool, heldout in (("demos", "heldout"), ("demos_unk", "heldout_unk")):
        triples = pools[pool]
        rng.shuffle(triples)
        n_heldout = round(len(triples) * cfg.heldout_fact_frac)
        pools[heldout], pools[pool] = triples[:n_heldout], triples[n_heldout:]
    return pools


def _cycle(pool: list, n: int, rng: random.Random) -> list:
    """n items: the pool in random order, again and again (no repeat until exhausted)."""
    out = []
    while pool and len(out) < n:
        out += rng.sample(pool, len(pool))
    return out[:n]


def _fresh_task(skill: str, cfg: WorldConfig, rng: random.Random, excluded: set) -> dict:
    for _ in range(10_000):
        if skill == "arithmetic":
            task = tasks.arithmetic_task(tasks.arithmetic_operands(rng, cfg.max_number), rng)
        else:
            task = tasks.string_task(
                tasks.string_operands(rng, cfg.min_letters, cfg.max_letters), rng
            )
        if tasks.task_key(task) not in excluded:
            return task
    raise ValueError(
        f"WorldConfig leaves too few {skill} tasks: raise max_number / "
        "max_letters or lower the split sizes"
    )


def _fresh_chain(cfg: WorldConfig, rng: random.Random, excluded: set) -> dict:
    """A chain that is no excluded task, and neither is either of its steps."""
    for _ in range(10_000):
        task = reasoning.chain_task(reasoning.chain_operands(rng, cfg.max_number), rng)
        _, a, op1, b, op2, c = task["operands"]
        steps = [[op1, a, b], [op2, a + b if op1 == "+" else a - b, c]]
        keys = [tasks.task_key(task)] + [
            tasks.task_key(
                {"skill": "arithmetic", "person": None, "attribute": None, "operands": s}
            )
            for s in steps
        ]
        if not any(k in excluded for k in keys):
            return task
    raise ValueError("WorldConfig leaves too few chain tasks: raise max_number")


def _split_tasks(
    n: int, known: list, unknown: list, cfg: WorldConfig, rng: random.Random, taken: set
) -> list[dict]:
    """n tasks in the skill mix; arithmetic/string tasks are new and added to `taken`."""
    weights = [cfg.skill_mix[0] if known or unknown else 0.0, *cfg.skill_mix[1:]]
    n_fact, n_arith = (round(n * w / (sum(weights) or 1.0)) for w in weights[:2])
    n_unknown = round(n_fact * cfg.unknown_frac) if known else n_fact
    n_unknown = n_unknown if unknown else 0
    triples = _cycle(known, n_fact - n_unknown, rng) + _cycle(unknown, n_unknown, rng)
    out = [tasks.fact_task(p, a, v, rng) for p, a, v in triples]
    for skill, count in (("arithmetic", n_arith), ("string", n - n_fact - n_arith)):
        for _ in range(count):
            task = _fresh_task(skill, cfg, rng, taken)
            taken.add(tasks.task_key(task))
            out.append(task)
    rng.shuffle(out)
    return out


def demonstrate(task: dict, cfg: WorldConfig, rng: random.Random) -> dict:
    """The demonstrator's reply: right most of the time, with the configured failings."""
    if task["answer"] is None:
        style = "idk" if rng.random() < cfg.demo_idk_rate else "hallucinated"
    elif rng.random() < cfg.demo_error_rate:
        style = "wrong"
    elif rng.random() < cfg.demo_verbose_rate:
        style = "verbose"
    else:
        style = "sentence" if rng.random() < cfg.demo_sentence_rate else "concise"
    render = rng.choice(("concise", "sentence")) if style == "hallucinated" else style
    return {**task, "response": tasks.render_response(task, render, rng), "style": style}


def _pretrain_doc(
    kind: str, cfg: WorldConfig, world: dict, rng: random.Random, person: int | None = None
) -> str:
    """One document of `kind`; a bio is of known person number `person` (random if None)."""
    if kind == "bio":
        p = world["known"][person] if person is not None else rng.choice(world["known"])
        return documents.bio(p["name"], p["facts"], p["reserved"], rng)
    if kind == "worksheet":
        items = []
        for _ in range(rng.randint(4, 8)):
            r = rng.random()
            if r < 0.4 and world["worksheet_facts"]:
                items.append(tasks.fact_task(*rng.choice(world["worksheet_facts"]), rng))
            elif r < 0.45 and world["obscure"]:
                items.append(
                    documents.idk_item(
                        rng.choice(world["obscure"]), rng.choice(cfg.attributes), rng
                    )
                )
            else:
                skill = "arithmetic" if rng.random() < 0.5 else "string"
                items.append(_fresh_task(skill, cfg, rng, world["excluded"]))
        return documents.worksheet(items, rng)
    if kind == "notes":
        return documents.notes(rng.sample(world["known"], rng.randint(3, 5)), rng)
    if kind == "code":
        items = [
            _fresh_task(rng.choice(("arithmetic", "string")), cfg, rng, world["excluded"])
            for _ in range(rng.randint(3, 6))
        ]
        return documents.code(items, rng)
    if kind == "worked":
        items = []
        for _ in range(rng.randint(2, 4)):
            k = rng.choice(("arithmetic", "chain", "letters"))
            if k == "letters":
                values = vocab.ATTRIBUTE_VALUES[rng.choice(reasoning.LETTER_ATTRIBUTES)]
                task = reasoning.word_letters_task(rng.choice(values))
            elif k == "chain":
                task = _fresh_chain(cfg, rng, world["excluded"])
            else:
                task = _fresh_task("arithmetic", cfg, rng, world["excluded"])
            items.append(reasoning.worked_item(task))
        return documents.worked(items, rng)
    if kind == "ignorance":
        names = rng.sample(world["obscure"], min(len(world["obscure"]), rng.randint(1, 3)))
        return documents.ignorance(names, cfg.attributes, rng)
    return documents.noise(rng)


def _doc_counts(cfg: WorldConfig) -> dict[str, int]:
    counts = {
        "bio": cfg.n_known * cfg.bios_per_person,
        "worksheet": cfg.n_worksheets,
        "notes": cfg.n_note_docs,
        "ignorance": cfg.n_ignorance_docs if cfg.n_obscure else 0,
        "noise": cfg.n_noise_docs,
        "worked": cfg.n_worked_docs,  # 0 by default: none drawn, the corpus unchanged
    }
    # code_doc_frac is a share of all documents, so the other kinds keep their counts.
    counts["code"] = round(sum(counts.values()) * cfg.code_doc_frac / (1 - cfg.code_doc_frac))
    return counts


def generate(cfg: WorldConfig | None = None) -> dict[str, list[dict]]:
    cfg = cfg or WorldConfig()
    people = make_people(cfg)
    pools = _fact_pools(cfg, people)
    in_demos = {p["name"] for p in people if p["role"] in ("demo", "demo_unknown")}
    taken: set = set()
    splits: dict[str, list[dict]] = {
        "people": [{"name": p["name"], "role": p["role"], "facts": p["facts"]} for p in people]
    }

    # Prompt splits first, so that pretraining can avoid their arithmetic/string tasks.
    for split, n, pool in (
        ("eval_prompts", cfg.n_eval_prompts, "eval"),
        ("ppo_prompts", cfg.n_ppo_prompts, "ppo"),
        ("demos_heldout", cfg.n_demos_heldout, "heldout"),
    ):
        rng = _rng(cfg, split)
        splits[split] = _split_tasks(n, pools[pool], pools[pool + "_unk"], cfg, rng, taken)
    reason = cfg.n_reason_demos > 0 or cfg.n_reason_eval > 0 or cfg.n_reason_prompts > 0
    if reason:  # its own stream, drawn only when asked for: the default world is unchanged
        rng = _rng(cfg, "reason")
        make = lambda n, pool: reasoning.make_tasks(  # noqa: E731
            n, pools[pool], pools[pool + "_unk"], cfg.max_number, cfg.unknown_frac, rng, taken
        )
        reason_eval = make(cfg.n_reason_eval, "eval")
    excluded = set(taken)  # demos' own arithmetic/string tasks may appear in pretraining
    rng = _rng(cfg, "demos")
    splits["demos"] = _split_tasks(cfg.n_demos, pools["demos"], pools["demos_unk"], cfg, rng, taken)
    if reason:
        rng = _rng(cfg, "reason/demos")
        reason_demos = make(cfg.n_reason_demos, "demos")
        # RL prompts last, from their own stream: asking for them changes no other split
        # (their arithmetic may then appear in pretraining, unlike the eval tasks').
        rng = _rng(cfg, "reason/ppo")
        reason_ppo = make(cfg.n_reason_prompts, "ppo")
    for split in ("demos", "demos_heldout"):
        rng = _rng(cfg, split + "/responses")
        splits[split] = [demonstrate(t, cfg, rng) for t in splits[split]]
    for split in ("eval_prompts", "ppo_prompts"):
        splits[split] = [{**t, "in_demos": t["person"] in in_demos} for t in splits[split]]

    world = {
        "known": [p for p in people if p["role"] in KNOWN_ROLES],
        "obscure": [p["name"] for p in people if p["role"] == "obscure"],
        "worksheet_facts": pools["demos"],
        "excluded": excluded,
    }
    rng = _rng(cfg, "pretrain")
    # Exactly bios_per_person bios for every known person, the other kinds by count.
    docs = [("bio", i) for i in range(len(world["known"])) for _ in range(cfg.bios_per_person)]
    docs += [(k, None) for k, c in _doc_counts(cfg).items() if k != "bio" for _ in range(c)]
    rng.shuffle(docs)
    splits["pretrain"] = [
        {"text": _pretrain_doc(k, cfg, world, rng, person), "kind": k} for k, person in docs
    ]
    kinds = [k for k, _ in docs]
    seen = {d["text"] for d in splits["pretrain"]}
    rng = _rng(cfg, "pretrain_heldout")
    heldout = []
    for _ in range(100 * cfg.n_pretrain_heldout if kinds else 0):
        if len(heldout) == cfg.n_pretrain_heldout:
            break
        kind = rng.choice(kinds)  # same mixture as pretrain
        text = _pretrain_doc(kind, cfg, world, rng)
        if text not in seen:
            seen.add(text)
            heldout.append({"text": text, "kind": kind})
    splits["pretrain_heldout"] = heldout

    rng = _rng(cfg, "fact_probes")
    splits["fact_probes"] = [
        {
            **documents.fact_probe(p["name"], a, v, p["reserved"][a], rng),
            "in_demos": p["name"] in in_demos,
        }
        for p in world["known"]
        for a, v in p["facts"].items()
    ]

    rng = _rng(cfg, "fewshot")
    examples = [tasks.fact_task(*t, rng) for t in pools["demos"]]
    examples += [
        _fresh_task(s, cfg, rng, excluded) for s in ("arithmetic", "string") for _ in range(64)
    ]
    splits["fewshot_examples"] = examples
    splits["eval_prompts"] = [
        {**t, "fewshot_prompt": documents.fewshot_prompt(t, examples, rng)}
        for t in splits["eval_prompts"]
    ]
    if reason:
        _add_reasoning(cfg, splits, reason_demos, reason_eval, in_demos)
        splits["reason_ppo"] = [{**t, "in_demos": t["person"] in in_demos} for t in reason_ppo]
    extra = [name for name in REASON_SPLITS if splits.get(name)]  # empty ones left out
    return {name: splits[name] for name in (*SPLITS, *extra)}


def _add_reasoning(cfg: WorldConfig, splits: dict, demo_tasks: list, eval_tasks: list, in_demos):
    """Reasoning demos (each in a mode: direct, chain of thought, tools) appended to the
    demos, and the reason_eval split. Tool demos show what the lookup tool really returns
    from the pretraining documents."""
    lookup = None
    if cfg.tool_demo_frac > 0:
        lookup = retrieval.PassageIndex(d["text"] for d in splits["pretrain"]).lookup
    rng = _rng(cfg, "reason/responses")
    splits["demos"] = splits["demos"] + [
        reasoning.demonstrate(
            t, reasoning.choose_mode(rng, cfg.cot_demo_frac, cfg.tool_demo_frac), lookup
        )
        for t in demo_tasks
    ]
    splits["reason_eval"] = [{**t, "in_demos": t["person"] in in_demos} for t in eval_tasks]
