"""A passage index over a corpus: the `lookup` tool's retrieval (BM25, Robertson &
Zaragoza 2009), built from documents only.

Passages are the corpus's statements: its sentences (split after ". ", "? ", "! " and at
newlines), deduplicated, questions left out (they state nothing). A query's first two
words are its subject (a name, a phrase): a passage is a *candidate* only if it holds
them as a phrase; the query's words rank the candidates by Okapi BM25 (k1, b). The gate
is what makes "nothing is known" an empty result: a query about a person nobody wrote
about ("xo ri works") shares single words with thousands of sentences (every "ri", every
"works"), but no sentence holds the name "xo ri". A one-word query is gated on that word.
"""

from __future__ import annotations

import collections
import math
import re
from collections.abc import Iterable

_SENTENCE_END = re.compile(r"(?<=[.?!])\s+|\n+")
_WORD = re.compile(r"[a-z0-9']+")


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def passages(documents: Iterable[str]) -> list[str]:
    """The distinct sentences of `documents`, in first-seen order."""
    seen: dict[str, None] = {}
    for doc in documents:
        for sentence in _SENTENCE_END.split(doc):
            sentence = sentence.strip()
            if words(sentence) and not sentence.endswith("?"):
                seen.setdefault(sentence, None)
    return list(seen)


class PassageIndex:
    """BM25 over passages, gated by query bigrams (module docstring)."""

    def __init__(self, documents: Iterable[str], k1: float = 1.2, b: float = 0.75):
        self.passages = passages(documents)
        self._words = [words(p) for p in self.passages]
        self._k1, self._b = k1, b
        self._avg_len = sum(map(len, self._words)) / max(len(self._words), 1)
        self._postings: dict[str, list[int]] = collections.defaultdict(list)
        self._bigrams: dict[tuple[str, str], list[int]] = collections.defaultdict(list)
        for i, ws in enumerate(self._words):
            for w in dict.fromkeys(ws):
                self._postings[w].append(i)
            for bg in dict.fromkeys(zip(ws, ws[1:])):
                self._bigrams[bg].append(i)

    def _idf(self, word: str) -> float:
        n, df = len(self.passages), len(self._postings.get(word, ()))
        return math.log(1 + (n - df + 0.5) / (df + 0.5))

    def search(self, query: str, k: int = 1) -> list[str]:
        """The top-k candidate passages for `query`, best first (ties: corpus order)."""
        q = words(query)
        if not q:
            return []
        gate = self._bigrams.get((q[0], q[1]), ()) if len(q) > 1 else self._postings.get(q[0], ())
        scored = []
        for i in gate:
            counts = collections.Counter(self._words[i])
            norm = self._k1 * (1 - self._b + self._b * len(self._words[i]) / self._avg_len)
            score = sum(
                self._idf(w) * counts[w] * (self._k1 + 1) / (counts[w] + norm)
                for w in set(q)
                if counts[w]
            )
            scored.append((-score, i))
        return [self.passages[i] for _, i in sorted(scored)[:k]]

    def lookup(self, query: str, k: int = 1) -> str:
        """The `lookup` tool: the top-k passages joined by spaces ("" when none)."""
        return " ".join(self.search(query, k))
