"""WorldConfig: the seed, every knob of the world, and the size of every split.

Defaults are sized for the `tiny` model (~1M params, 2 CPU cores, minutes): ~1.3M
pretraining tokens with a 512-piece BPE, 128 known people. A 0.82M-param model
trained on ~0.9M tokens learnt the facts of 100-200 people (96-99% QA on held-out
people) but only 19% with 300, so n_known = 128 sits inside the range that was learnt,
well short of that cliff; bios_per_person (~77 exposures of each fact) and the
document counts set the corpus size.

The knobs are the ones the sweeps vary, one per finding: code_doc_frac,
demo_error_rate, demo_verbose_rate, demo_idk_rate, length_weight, label_noise, and the
split sizes. Every random choice of the generator draws from its own stream seeded by
(seed, stream name), so changing one knob leaves unrelated data unchanged: the same
people and facts for every code_doc_frac, for instance.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json

from gptjax.world import labeler, vocab

# Bump when the generator's output changes for an unchanged config: it is part of
# content_hash, which names cached datasets.
GENERATOR_VERSION = 4


# The fields only the labeler reads: the pretraining text and the demos do not depend on
# them (experiments/pipeline.py leaves them out of the keys of stages that never judge).
LABELER_FIELDS = ("length_weight", "label_noise")


@dataclasses.dataclass(frozen=True)
class WorldConfig:
    seed: int = 0

    # People. Known people have facts in the corpus; of them, a demo_people_frac share
    # are "demo people" (facts also in worksheets and SFT demos), the rest are split
    # between PPO and eval prompts. Unknown people never appear in pretraining or demos
    # (they are split between PPO and eval prompts); demo_unknown people are absent from
    # pretraining too and teach "i don't know" in demos; obscure people appear in
    # pretraining only, in sentences that admit ignorance about them.
    n_known: int = 128
    n_unknown: int = 40
    n_demo_unknown: int = 16
    n_obscure: int = 16
    n_attributes: int = 4  # the first n of vocab.ATTRIBUTES
    demo_people_frac: float = 0.5
    eval_people_frac: float = 0.25  # of known people; the rest are PPO people
    eval_unknown_frac: float = 0.6  # of unknown people; the rest are PPO unknowns
    heldout_fact_frac: float = 0.1  # of demo facts, kept for demos_heldout
    # Strangers: > 0 gives every never-read-about person (unknown, demo_unknown) a name
    # whose first syllable is one of the last `stranger_syllables` of
    # vocab.NAME_SYLLABLES, and no one else a name with any of them. 0: every name from
    # one pool, so only memory tells who is unknown (world v3). Measured at tiny with 0:
    # the SFT model cannot tell a person it never read about from one it did (a linear
    # probe on its logits: AUC 0.58 on held-out people; its top value's probability:
    # 0.70), it abstains on 0% of unknown people greedily, and nothing RLHF can learn
    # raises gold reward greedily (PPO − SFT −0.01..−0.03 for every RM and β tried).
    # With 4 (v4, same seed, β 0.3): SFT abstains on 23% of unknown people, PPO on 72%,
    # gold +0.087 greedy / +0.107 at T=1, accuracy −0.002. Large models know what they
    # know (Kadavath et al. 2022); a 1M-param one needs the stranger to look strange.
    stranger_syllables: int = 4

    # Pretraining documents ("the internet").
    bios_per_person: int = 90  # facts need many exposures in varied wordings
    n_worksheets: int = 4000
    n_note_docs: int = 12000  # several people's facts in one text (documents.notes)
    n_ignorance_docs: int = 600
    n_noise_docs: int = 1500
    code_doc_frac: float = 0.15  # fraction of all pretraining documents that are code
    n_pretrain_heldout: int = 600  # documents, for the held-out LM loss (alignment tax)

    # Tasks.
    max_number: int = 99  # arithmetic operands are 0..max_number (1-2 digits)
    min_letters: int = 3
    max_letters: int = 6
    skill_mix: tuple[float, float, float] = (0.5, 0.25, 0.25)  # fact, arithmetic, string
    unknown_frac: float = 0.25  # of fact prompts in each split, about unknown people

    # SFT demonstrations and prompt splits.
    n_demos: int = 3072
    n_demos_heldout: int = 256
    n_ppo_prompts: int = 2048
    n_eval_prompts: int = 512
    # The demonstrator: careful, terse, one sentence per skill (vocab.FACT_SENTENCES), as
    # InstructGPT's labelers wrote to guidelines; the sweeps raise these rates. Measured
    # (tiny, same base model, 150 SFT steps, gold reward greedy / T=1 against the base
    # model prompted few-shot, 0.076 / -0.024): errors 0.1, rambling 0.2, half bare
    # answers, idk 0.25 (generator v2): 0.011 / -0.349; errors 0, rambling 0.2, all
    # sentences: 0.157 / -0.076; + idk 0.5: 0.131 / -0.045; + 250 steps: 0.166 / -0.037;
    # errors 0, no rambling, idk 0.5 (these defaults): 0.164 / 0.025; the same with
    # errors 0.1: 0.120 / -0.086 at idk 0.25.
    demo_error_rate: float = 0.0  # demonstrator gives a wrong answer
    demo_verbose_rate: float = 0.0  # of its correct replies, the share that ramble
    demo_sentence_rate: float = 1.0  # of the other correct replies: a sentence, not bare
    # "i don't know" on unknown people; the rest hallucinate. Below the optimal 1.0 so
    # that RLHF has room to raise abstention. Measured with the v2 generator: at 0.5 the
    # SFT model also said it did not know 15% of known people's facts and PPO cut
    # accuracy; with one answer sentence per skill, 0.5% greedy (8% at T=1).
    demo_idk_rate: float = 0.5

    # Thinking and tools (gptjax/world/reasoning.py); 0 = off, the world unchanged.
    # Reasoning demos (arithmetic, two-step chains, letters of a fact, facts; the
    # demo people's facts) appended to the demos, each in one mode: chain of thought with
    # probability cot_demo_frac, a tool call with tool_demo_frac, else the direct answer.
    n_reason_demos: int = 0
    n_reason_eval: int = 0  # reason_eval split: the same kinds on eval people / unknowns
    n_reason_prompts: int = 0  # reason_ppo split, for RL: the same kinds on PPO people
    cot_demo_frac: float = 0.0
    tool_demo_frac: float = 0.0  # needs tools.names with calc and lookup
    # Pretraining documents solved step by step (documents.worked): operands and results
    # restated, so the base model learns to copy them (see the README's reasoning results).
    n_worked_docs: int = 0

    # Labeler (LABELER_FIELDS: they change how replies are judged, no generated text).
    length_weight: float = labeler.DEFAULT_LENGTH_WEIGHT  # >0 rewards detail
    label_noise: float = labeler.DEFAULT_LABEL_NOISE  # BT disagreement with gold labels

    def __post_init__(self):
        counts = (
            "n_known n_unknown n_demo_unknown n_obscure bios_per_person n_worksheets "
            "n_note_docs n_ignorance_docs n_noise_docs n_pretrain_heldout n_demos n_demos_heldout "
            "n_ppo_prompts n_eval_prompts n_reason_demos n_reason_eval n_reason_prompts "
            "n_worked_docs"
        ).split()
        for name in counts:
            if getattr(self, name) < 0:
                raise ValueError(f"WorldConfig.{name} must be >= 0, got {getattr(self, name)}")
        if self.n_known < 4:
            raise ValueError(f"WorldConfig.n_known must be >= 4, got {self.n_known}")
        fracs = (
            "demo_people_frac eval_people_frac eval_unknown_frac heldout_fact_frac "
            "unknown_frac demo_error_rate demo_verbose_rate demo_sentence_rate demo_idk_rate "
            "cot_demo_frac tool_demo_frac"
        ).split()
        for name in fracs:
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"WorldConfig.{name} must be in [0, 1], got {getattr(self, name)}")
        if self.cot_demo_frac + self.tool_demo_frac > 1.0:
            raise ValueError("WorldConfig.cot_demo_frac + tool_demo_frac must be <= 1")
        if self.demo_people_frac + self.eval_people_frac > 1.0:
            raise ValueError("WorldConfig.demo_people_frac + eval_people_frac must be <= 1")
        if not 0.0 <= self.code_doc_frac < 1.0:
            raise ValueError(
                f"WorldConfig.code_doc_frac must be in [0, 1), got {self.code_doc_frac}"
            )
        if not 0.0 <= self.label_noise < 0.5:
            raise ValueError(f"WorldConfig.label_noise must be in [0, 0.5), got {self.label_noise}")
        if not 1 <= self.n_attributes <= len(vocab.ATTRIBUTES):
            raise ValueError(
                f"WorldConfig.n_attributes must be in [1, "
                f"{len(vocab.ATTRIBUTES)}], got {self.n_attributes}"
            )
        if not 2 <= self.min_letters <= self.max_letters <= len(vocab.LETTERS):
            raise ValueError(
                "WorldConfig.min_letters / max_letters must satisfy "
                "2 <= min_letters <= max_letters <= 26"
            )
        if not 1 <= self.max_number <= 999:
            raise ValueError(f"WorldConfig.max_number must be in [1, 999], got {self.max_number}")
        if len(self.skill_mix) != 3 or min(self.skill_mix) < 0 or sum(self.skill_mix) <= 0:
            raise ValueError(
                f"WorldConfig.skill_mix must be 3 non-negative weights "
                f"(fact, arithmetic, string), got {self.skill_mix}"
            )
        n_syllables = len(vocab.NAME_SYLLABLES)
        if not 0 <= self.stranger_syllables < n_syllables:
            raise ValueError(
                f"WorldConfig.stranger_syllables must be in [0, {n_syllables}), "
                f"got {self.stranger_syllables}"
            )
        n_people = self.n_known + self.n_unknown + self.n_demo_unknown + self.n_obscure
        n_names = n_syllables * (n_syllables - 1)
        if n_people > n_names:
            raise ValueError(
                f"WorldConfig.n_known + n_unknown + n_demo_unknown + n_obscure "
                f"= {n_people} exceeds the {n_names} possible names"
            )
        if self.stranger_syllables:
            n_strange = self.stranger_syllables * (n_syllables - 1)
            n_common = n_syllables - self.stranger_syllables
            n_plain = n_common * (n_common - 1)
            n_strangers = self.n_unknown + self.n_demo_unknown
            if n_strangers > n_strange or n_people - n_strangers > n_plain:
                raise ValueError(
                    f"WorldConfig.stranger_syllables={self.stranger_syllables} gives "
                    f"{n_strange} names to {n_strangers} strangers and {n_plain} "
                    f"to {n_people - n_strangers} others: too few"
                )

    @property
    def attributes(self) -> tuple[str, ...]:
        return vocab.ATTRIBUTES[: self.n_attributes]

    @property
    def label_temperature(self) -> float:
        """Bradley-Terry temperature that gives label_noise disagreement (see labeler)."""
        return labeler.temperature_for_noise(self.label_noise, self.length_weight)

    def replace(self, **changes) -> WorldConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def content_hash(self) -> str:
        """Names the generated data: same hash, same bytes."""
        blob = json.dumps({"version": GENERATOR_VERSION, **self.to_dict()}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]
