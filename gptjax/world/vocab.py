"""Every word the world can say: names, attribute values and the sentence templates.

Kept in one place so that the character set stays small (lowercase letters, digits,
space, newline and `. , : ? ' = + - # > ( ) "`) and the word list short, which a
512-piece BPE covers well, and so that tests can check that no name or value collides
with another word of the world.

Names are two tokens wherever they occur, because of two conventions (a word at the
start of a line has no leading space, so it would tokenize differently):
- no pretraining line or document starts with a name;
- no chat response starts with a name (responses start with the answer, "it", "the",
  "well," ...).
Templates use `{n}` for a name and `{v}` for an attribute value; a fact template ends
with its value so that its prefix is a completion probe ("... lives in" -> "oslo").
"""

# A name is two different syllables written as two words ("ka ri"), all from one
# syllable set. Written as two words, a name can never be merged by BPE into one piece
# (pieces never cross spaces) and each syllable of a corpus person is frequent enough to
# be one piece: their names are 2 tokens everywhere. WorldConfig.stranger_syllables
# keeps the last few out of the corpus, for the names of the people no document
# mentions (those syllables then split into letters); with 0, an unknown person's name
# is made of exactly the tokens known people's names are made of.
NAME_SYLLABLES = tuple("ka zu ri mo bo ne fi lu ta vi ke da su ro ja pe xo ti".split())

# Attributes in the order they are used (WorldConfig.n_attributes takes a prefix).
# Values are short single words (few BPE pieces), distinct across attributes; jobs and
# pets start with a consonant so that "a {v}" is always grammatical.
ATTRIBUTE_VALUES: dict[str, tuple[str, ...]] = {
    "town": tuple("oslo rome lima bern riga baku doha lyon cork pisa kobe nara".split()),
    "job": tuple("baker nurse pilot cook judge guard clerk miner poet chef tutor smith".split()),
    "pet": tuple("cat dog hen rat pig cow yak frog crab duck goat mole".split()),
    "color": tuple("red blue green pink gray gold black white brown teal tan navy".split()),
    "instrument": tuple("harp drum flute lute horn banjo piano tuba oboe cello sitar gong".split()),
}
ATTRIBUTES = tuple(ATTRIBUTE_VALUES)

# Biography sentences. Each ends with the value. For every (person, attribute) one
# template is reserved for the fact probes and never used in pretraining for that fact.
BIO_TEMPLATES: dict[str, tuple[str, ...]] = {
    "town": (
        "{n} lives in {v}.",
        "{n} has a home in {v}.",
        "the town where {n} lives is {v}.",
        "years ago {n} moved to {v}.",
        "you can find {n} in {v}.",
        "{n} resides in {v}.",
    ),
    "job": (
        "{n} works as a {v}.",
        "{n} earns a living as a {v}.",
        "by trade, {n} is a {v}.",
        "the job of {n} is {v}.",
        "{n} is employed as a {v}.",
        "at work, {n} is a {v}.",
    ),
    "pet": (
        "{n} has a pet {v}.",
        "at home, {n} keeps a {v}.",
        "the pet of {n} is a {v}.",
        "{n} takes care of a {v}.",
        "every day {n} feeds a {v}.",
        "{n} owns a {v}.",
    ),
    "color": (
        "{n} likes the color {v}.",
        "the favorite color of {n} is {v}.",
        "{n} loves anything {v}.",
        "{n} always wears {v}.",
        "the color {n} prefers is {v}.",
        "{n} painted the door {v}.",
    ),
    "instrument": (
        "{n} plays the {v}.",
        "{n} practices the {v}.",
        "the instrument of {n} is the {v}.",
        "in a band, {n} plays the {v}.",
        "{n} took lessons on the {v}.",
        "{n} performs on the {v}.",
    ),
}
BIO_INTROS = (
    "this is about {n}.",
    "a short note on {n}.",
    "here is what we know of {n}.",
    "some facts about {n}.",
    "meet {n}.",
    "a page about {n}.",
)

# Questions, used by chat prompts and by worksheets alike.
FACT_QUESTIONS: dict[str, tuple[str, ...]] = {
    "town": ("where does {n} live?", "which town does {n} live in?", "what town is home to {n}?"),
    "job": ("what is the job of {n}?", "what does {n} do for a living?", "what work does {n} do?"),
    "pet": ("what pet does {n} have?", "which animal does {n} keep?", "what is the pet of {n}?"),
    "color": (
        "what color does {n} like?",
        "what is the favorite color of {n}?",
        "which color does {n} prefer?",
    ),
    "instrument": (
        "what instrument does {n} play?",
        "which instrument does {n} play?",
        "what does {n} play in the band?",
    ),
}
ARITHMETIC_QUESTIONS = (
    "what is {a} {op} {b}?",
    "compute {a} {op} {b}.",
    "{a} {op} {b} = ?",
    "please work out {a} {op} {b}.",
)
STRING_QUESTIONS: dict[str, tuple[str, ...]] = {
    "reverse": ("reverse the letters: {s}", "write {s} backwards.", "what is {s} reversed?"),
    "sort": ("sort the letters: {s}", "put {s} in order.", "what is {s} sorted?"),
    "count": (
        "how many letters are in {s}?",
        "count the letters: {s}",
        "how many letters does {s} have?",
    ),
}

# Answer sentences (chat responses): one per skill, as a demonstrator's style guide would
# have it. Each adds 2-3 words to the answer, so the gold labeler counts it as concise.
# Measured (tiny, same base model, 150 SFT steps): with 3-4 paraphrases per skill, some
# starting with the person's name ("so ka ri lives in oslo."), SFT sampled at T=1 drifted
# into other attributes' sentences and gave the right fact 26% of the time; with this one
# sentence per skill, 62% (greedy 0.74 -> 0.90), at 0.61 nats/token instead of 1.07.
# The sentence is kept (not the bare answer): bare-answer demos cut accuracy on people
# absent from the demos from 0.70 to 0.23, as if "it is" gave the model the positions it
# needs to look the fact up.
FACT_SENTENCES: dict[str, str] = {
    "town": "it is {v}.",
    "job": "it is {v}.",
    "pet": "it is a {v}.",
    "color": "it is {v}.",
    "instrument": "it is the {v}.",
}
ARITHMETIC_SENTENCE = "it is {c}."
STRING_SENTENCE = "it is {r}."
# Appended to the answer sentence to make a rambling (verbose) response: 4+
# words each, words frequent in pretraining text so that they are few BPE pieces; the
# first is the shortest, used after long answers to keep replies within 16 tokens.
FILLERS = ("i know the facts.", "that is what i know.", "here is what i know.")
IDK_RESPONSES = ("i don't know.", "sorry, i don't know.", "i am not sure.", "i have no idea.")
IDK_FACT_RESPONSES: dict[str, str] = {
    "town": "i don't know where {n} lives.",
    "job": "i don't know what {n} does.",
    "pet": "i don't know what pet {n} has.",
    "color": "i don't know what color {n} likes.",
    "instrument": "i don't know what {n} plays.",
}
# Replies that answer nothing (labelled malformed): they contain no value, no number
# and no letter sequence.
NON_ANSWERS = (
    "that is a good question.",
    "let me think about that.",
    "hmm, well.",
    "the the the.",
    "questions are fun.",
)

# Pretraining text admitting ignorance, about "obscure" people only.
IGNORANCE_SENTENCES: dict[str, tuple[str, ...]] = {
    "town": ("i don't know where {n} lives.", "nobody knows where {n} lives."),
    "job": ("i don't know what {n} does for a living.", "nobody knows the job of {n}."),
    "pet": ("i don't know what pet {n} has.", "nobody knows if {n} has a pet."),
    "color": ("i don't know what color {n} likes.", "nobody knows the favorite color of {n}."),
    "instrument": ("i don't know what {n} plays.", "nobody knows if {n} plays music."),
}
IGNORANCE_INTROS = (
    "we know very little about {n}.",
    "there is no record of {n}.",
    "a note on {n}.",
)

NOTES_TITLES = (
    "town records:",
    "notes:",
    "from the news:",
    "people we met:",
    "a list of facts:",
    "the register says:",
)
WORKSHEET_TITLES = tuple("worksheet quiz practice exercises homework questions".split())

# Words for noise documents (they never include names).
NOISE_WORDS = tuple(
    "the a and of in to is it on at old new big small day night road tree water stone light "
    "wind rain house bread song book page note list".split()
)
LETTERS = "abcdefghijklmnopqrstuvwxyz"
