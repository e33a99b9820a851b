"""Quality signals of mined pairs and the optional filters on them (plain Python, no Ray).

Every pair carries: ``area_fraction`` (mask pixels / image pixels), ``score_margin`` (its cosine
minus the noun's second-best proposal's: small means the noun hardly preferred this mask; null when
the image had one region), ``objectness`` (the proposal's MaskFormer objectness, 1 - its "no
object" probability with the image's nouns as vocabulary) and ``caption_index`` (which of the
image's captions the noun came from).

**Duplicates** (one documented rule): when a compound and its head noun ("dining table" and
"table") are matched to the same proposal of an image, the compound is the pair's name and the
head's pair is the duplicate: its ``duplicate_of`` holds the compound (``""`` for every other
pair). ``filters.duplicates: drop`` leaves such rows out (the merge); ``flag`` (default) keeps them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class PairSignals:
    noun_index: int
    proposal: int  # position in the image's proposal list
    score: float
    area_fraction: float
    score_margin: float | None
    objectness: float
    caption_index: int
    duplicate_of: str = ""


def duplicates_of(nouns: list[str], proposals: list[int]) -> list[str]:
    """For each pair (noun, proposal), the compound whose head it is and that took the same proposal."""
    flagged = []
    for noun, proposal in zip(nouns, proposals):
        compounds = [other for other, p in zip(nouns, proposals)
                     if p == proposal and other != noun and other.split()[-1] == noun and " " in other]
        flagged.append(compounds[0] if compounds else "")
    return flagged


def keep(signals: PairSignals, filters: dict[str, Any]) -> bool:
    """Whether a pair passes the configured filters (``MiningConfig.filters`` as a dict)."""
    checks = (
        (filters.get("min_area_fraction"), lambda v: signals.area_fraction >= v),
        (filters.get("max_area_fraction"), lambda v: signals.area_fraction <= v),
        (filters.get("min_score_margin"), lambda v: signals.score_margin is None or signals.score_margin >= v),
        (filters.get("min_objectness"), lambda v: signals.objectness >= v),
        (filters.get("max_caption_index"), lambda v: signals.caption_index <= v),
    )
    if filters.get("duplicates") == "drop" and signals.duplicate_of:
        return False
    return all(check(value) for value, check in checks if value is not None)
