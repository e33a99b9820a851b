"""Precision and recall of a noun extractor on a labelled caption set (plain Python).

The set is a text file, one ``caption<TAB>noun; noun; ...`` per line (``#`` comments); see
``tests/data/labelled_captions.txt``. Counts are micro-averaged over all nouns of all captions.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class NounScores:
    captions: int
    true_positives: int
    extracted: int
    expected: int
    misses: tuple[tuple[str, tuple[str, ...], tuple[str, ...]], ...]  # (caption, extracted, expected)

    @property
    def precision(self) -> float:
        return self.true_positives / self.extracted if self.extracted else 1.0

    @property
    def recall(self) -> float:
        return self.true_positives / self.expected if self.expected else 1.0

    def line(self) -> str:
        return (f"{self.captions} captions: precision {self.precision:.3f} ({self.true_positives}/{self.extracted}), "
                f"recall {self.recall:.3f} ({self.true_positives}/{self.expected})")


def read_labelled(path: str | Path) -> list[tuple[str, list[str]]]:
    labelled = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        caption, _, nouns = line.partition("\t")
        labelled.append((caption, [n.strip() for n in nouns.split(";") if n.strip()]))
    return labelled


def score(extract: Callable[[str], list[str]], labelled: list[tuple[str, list[str]]]) -> NounScores:
    hits = extracted = expected = 0
    misses = []
    for caption, wanted in labelled:
        found = set(extract(caption))
        hits += len(found & set(wanted))
        extracted += len(found)
        expected += len(set(wanted))
        if found != set(wanted):
            misses.append((caption, tuple(sorted(found)), tuple(sorted(wanted))))
    return NounScores(len(labelled), hits, extracted, expected, tuple(misses))
