"""Haystack sources for the synthetic long-context tasks (RULER, Hsieh et al. 2024, arXiv 2404.06654).

Three kinds, as in RULER:

* **noise**: one short block of filler sentences repeated ("The grass is green. The sky is blue.
  ..."), the haystack of RULER's niah_single_1 / vt and of the passkey task (Mohtashami & Jaggi 2023).
* **needles**: a haystack made of distractor key/value lines built by the task itself (RULER's
  niah_multikey_2/3); this module only stitches them with :func:`insert_needles`.
* **prose**: natural text. RULER uses Paul Graham's essays (a download). We ship a public-domain book
  instead, *Alice's Adventures in Wonderland* by Lewis Carroll (1865), Project Gutenberg etext #11
  ("Millennium Fulcrum Edition 2.9"), taken from the Canterbury Corpus file ``alice29.txt`` in the
  PyPI source distribution ``brotli-1.2.1`` (see ``prose/README.md``). Scores on the prose tasks are
  therefore not identical to RULER's.

Train/eval separation: the book is split by chapter into a TRAIN part (odd chapters) and an EVAL
part (even chapters) that share no paragraph, and the noise block of each split uses different
sentences (EVAL uses RULER's block, TRAIN a paraphrase), so training never sees evaluation text.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

SPLITS = ("train", "eval")

PROSE_FILE = Path(__file__).parent / "prose" / "alice_in_wonderland.txt"
PROSE_SOURCE = (
    "Lewis Carroll, Alice's Adventures in Wonderland (1865), public domain; Project Gutenberg etext #11 "
    "as the Canterbury Corpus alice29.txt shipped in the PyPI sdist brotli-1.2.1"
)

#: The repeated filler block of each split. EVAL is RULER's (and InfiniteBench passkey's) noise.
NOISE = {
    "eval": "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.",
    "train": "The river is wide. The road is long. The stars are bright. On we walk. Round and round once more.",
}

_CHAPTER = re.compile(r"^\s*CHAPTER ([IVXL]+)\s*$", re.M)
_SENTENCE_END = re.compile(r"[.!?]['\")\]]*\s+")


def check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return split


def noise_block(split: str) -> str:
    """The filler block that a noise haystack repeats."""
    return NOISE[check_split(split)]


def noise_pieces(split: str, n: int) -> list[str]:
    """``n`` repetitions of the split's noise block, as insertion pieces (see :func:`insert_needles`)."""
    return [noise_block(split) + " "] * n


@lru_cache(maxsize=1)
def _chapters() -> tuple[tuple[str, ...], ...]:
    """The book's chapters, each a tuple of paragraphs (title lines dropped, lines unwrapped)."""
    text = PROSE_FILE.read_text(encoding="utf-8").replace("`", "'")
    parts = _CHAPTER.split(text)[1:]  # [numeral, body, numeral, body, ...]
    chapters = []
    for body in parts[1::2]:
        paragraphs = [" ".join(p.split()) for p in re.split(r"\n\s*\n", body)]
        # drop the chapter title (first paragraph), separators ("* * *") and "THE END"
        paragraphs = [p for p in paragraphs[1:] if re.search(r"[a-z]", p)]
        chapters.append(tuple(paragraphs))
    if len(chapters) != 12:
        raise RuntimeError(f"expected 12 chapters in {PROSE_FILE}, found {len(chapters)}")
    return tuple(chapters)


@lru_cache(maxsize=2)
def prose_paragraphs(split: str) -> tuple[str, ...]:
    """Paragraphs of the split's part of the book: TRAIN = chapters I, III, ..., XI; EVAL = II, IV, ..., XII."""
    first = 0 if check_split(split) == "train" else 1
    return tuple(p for ch in _chapters()[first::2] for p in ch)


def prose_text(split: str) -> str:
    """The split's prose as one string, paragraphs separated by blank lines (e.g. for perplexity/KL)."""
    return "\n\n".join(prose_paragraphs(split))


@lru_cache(maxsize=2)
def _prose_words(split: str) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """All words of the split's prose, with the index of the first word of every paragraph."""
    words: list[str] = []
    starts: list[int] = []
    for p in prose_paragraphs(split):
        starts.append(len(words))
        words.extend(p.split())
    return tuple(words), tuple(starts)


@dataclass(frozen=True)
class ProseStream:
    """Words of the split's prose read from paragraph ``start`` on, wrapping around at the end.

    As in RULER's essay haystack, the haystack is a prefix of ``n`` words (fine-grained sizing);
    paragraph breaks are kept.
    """

    split: str
    start: int = 0

    @classmethod
    def random(cls, split: str, rng: random.Random) -> "ProseStream":
        return cls(split, rng.randrange(len(prose_paragraphs(split))))

    def text(self, n: int) -> str:
        words, starts = _prose_words(self.split)
        para_start = set(starts)
        i = starts[self.start % len(starts)]
        out: list[str] = []
        for k in range(n):
            j = (i + k) % len(words)
            if k and j in para_start:
                out.append("\n\n")
            elif k:
                out.append(" ")
            out.append(words[j])
        return "".join(out)

    def pieces(self, n: int) -> list[str]:
        """The first ``n`` words as sentence pieces (needles go between sentences).

        A last sentence cut by the word limit is closed with "..." so that a needle placed after
        it does not run on from a half sentence.
        """
        pieces = split_sentences(self.text(n))
        if pieces and not _SENTENCE_END.search(pieces[-1] + " "):
            pieces[-1] = pieces[-1].rstrip() + "..."
        return pieces


def split_sentences(text: str) -> list[str]:
    """Split into sentence pieces that keep their trailing whitespace (``"".join(pieces) == text``).

    A regex stands in for NLTK's punkt, which RULER uses and which needs a download.
    """
    cuts = [m.end() for m in _SENTENCE_END.finditer(text)]
    bounds = [0, *[c for c in cuts if c < len(text)], len(text)]
    return [text[a:b] for a, b in zip(bounds, bounds[1:]) if b > a]


def depth_to_slot(depth: float, n_pieces: int) -> int:
    """Insertion slot (0..n_pieces) for a depth in [0, 1] (0 = start of the haystack, 1 = end)."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    return min(n_pieces, max(0, round(depth * n_pieces)))


def insert_needles(
    pieces: list[str], needles: list[str], slots: list[int], sep: str = " "
) -> tuple[str, list[tuple[int, int]]]:
    """Join ``pieces`` and insert ``needles[i]`` before ``pieces[slots[i]]``.

    Each needle is followed by ``sep`` (and preceded by it when the text before does not end in
    whitespace). Needles sharing a slot keep their order. Returns the text (trailing whitespace
    stripped) and the ``[start, end)`` span of every needle, in the order of ``needles``.
    """
    if len(needles) != len(slots):
        raise ValueError("one slot per needle")
    at: dict[int, list[int]] = {}
    for i, s in enumerate(slots):
        if not 0 <= s <= len(pieces):
            raise ValueError(f"slot {s} out of range 0..{len(pieces)}")
        at.setdefault(s, []).append(i)
    out: list[str] = []
    length = 0
    spans: list[tuple[int, int]] = [(0, 0)] * len(needles)
    for s in range(len(pieces) + 1):
        for i in at.get(s, []):
            if out and not out[-1][-1:].isspace():
                out.append(sep)
                length += len(sep)
            spans[i] = (length, length + len(needles[i]))
            out.append(needles[i] + sep)
            length += len(needles[i]) + len(sep)
        if s < len(pieces):
            out.append(pieces[s])
            length += len(pieces[s])
    return "".join(out).rstrip(), spans
