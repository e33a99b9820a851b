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
* **Plurals**: heads tagged NNS, or ending in "s" (the tagger calls many plurals NN), are
  singularised by :func:`singularize`, a small rule-based singulariser with exception lists
  (nltk's WordNet lemmatizer is deliberately not used: its corpus is not part of the data we ship).
* Nouns are deduplicated per image, keeping the first caption each came from.

Only two nltk resources are needed: ``averaged_perceptron_tagger_eng`` and ``stopwords``. A missing
one raises :class:`MissingNltkData` with the exact download command.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

NLTK_RESOURCES = ("averaged_perceptron_tagger_eng", "stopwords")
DOWNLOAD_COMMAND = "python -m nltk.downloader " + " ".join(NLTK_RESOURCES)

NOUN_TAGS = frozenset({"NN", "NNS"})
PLURAL_TAGS = frozenset({"NNS"})

# Nouns that name no visible region of the image: positions, framing, quantities, abstractions.
NON_VISUAL = frozenset("""
    top bottom side front back rear middle center centre left right edge end corner inside outside
    next near distance foreground background area part half direction position angle
    picture pictures image photo photograph photography snapshot shot view scene closeup close
    group bunch lot lots couple pair number variety kind type sort piece set row array assortment
    way day night time daytime today color colour shape size look thing things something stuff
    one ones other others use air sight display nothing anything everything someone somebody anyone
    everyone
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
    "street sign", "traffic cone", "remote control", "hot tub", "stuffed animal", "passenger train",
})

IRREGULAR_PLURALS = {
    "people": "person", "men": "man", "women": "woman", "children": "child", "feet": "foot",
    "teeth": "tooth", "geese": "goose", "mice": "mouse", "lice": "louse", "oxen": "ox",
    "knives": "knife", "wives": "wife", "lives": "life", "leaves": "leaf", "shelves": "shelf",
    "wolves": "wolf", "halves": "half", "calves": "calf", "loaves": "loaf", "thieves": "thief",
    "scarves": "scarf", "elves": "elf", "hooves": "hoof", "selves": "self",
    "cacti": "cactus", "fungi": "fungus", "octopi": "octopus", "radii": "radius", "alumni": "alumnus",
    "criteria": "criterion", "phenomena": "phenomenon", "axes": "axe", "dice": "die",
    "buses": "bus", "gases": "gas", "lenses": "lens", "canvases": "canvas", "atlases": "atlas",
    "irises": "iris", "bonuses": "bonus", "viruses": "virus", "campuses": "campus",
    "circuses": "circus", "walruses": "walrus", "octopuses": "octopus", "cactuses": "cactus",
    "platypuses": "platypus", "citruses": "citrus", "quizzes": "quiz", "waltzes": "waltz",
    "tomatoes": "tomato", "potatoes": "potato", "heroes": "hero", "echoes": "echo",
    "volcanoes": "volcano", "mangoes": "mango", "mosquitoes": "mosquito", "torpedoes": "torpedo",
    "dominoes": "domino", "buffaloes": "buffalo", "tornadoes": "tornado", "avocadoes": "avocado",
}
# Same form in singular and plural, or plural-only nouns that name one thing.
INVARIANT = frozenset("""
    sheep deer fish moose bison species series news aircraft offspring salmon trout shrimp swine
    cattle police glasses sunglasses eyeglasses goggles scissors pants trousers jeans shorts pajamas
    pyjamas tongs pliers binoculars clothes headphones earphones overalls tights leggings suds
    stairs
""".split())
# Singular words whose plural is "<word>s" although the plural ends like one that drops "es" or "ies".
IE_SINGULARS = frozenset("""
    cookie movie pie tie brownie smoothie hippie selfie zombie rookie calorie magpie necktie bowtie
    pixie goalie birdie beanie hoodie collie prairie lingerie veggie auntie sweetie boogie budgie
    genie newbie yuppie specie
""".split())
CHE_SINGULARS = frozenset("""
    moustache mustache avalanche niche cache cliche quiche creche headache ache panache microfiche
""".split())
# Plurals of nouns ending in -i (most words ending in -is are singular: tennis, iris, axis).
PLURAL_IS = frozenset("""
    skis taxis kiwis bikinis martinis safaris alibis wikis yetis khakis salamis zucchinis raviolis
    tsunamis emojis tikis hibachis paninis
""".split())
# Singular nouns ending in a single "s" that the rules would otherwise shorten.
SINGULAR_S = frozenset("""
    gas lens canvas atlas christmas pancreas bias alias chaos cosmos asbestos kudos ethos pathos
    thermos molasses measles mumps billiards darts dais mars
""".split())
MEN_NOT_PLURAL = frozenset("specimen omen abdomen stamen ramen semen hymen amen yemen".split())


def singularize(word: str) -> str:
    """Singular form of an English plural noun (lowercase), by rules plus exception lists.

    Words that already look singular ("glass", "bus", "tennis") come back unchanged.
    """
    word = word.lower()
    if word in INVARIANT or word in SINGULAR_S or len(word) <= 2:
        return word
    if word in IRREGULAR_PLURALS:
        return IRREGULAR_PLURALS[word]
    if word in PLURAL_IS:
        return word[:-1]
    if "-" in word:  # "t-shirts" -> "t-shirt", "passers-by" left alone
        head, _, last = word.rpartition("-")
        return f"{head}-{singularize(last)}" if last.endswith("s") else word
    if word.endswith("men") and word not in MEN_NOT_PLURAL:  # firemen, snowmen, businessmen
        return word[:-3] + "man"
    if word.endswith(("ss", "us", "is", "ics")):  # glass, cactus, tennis, physics: not plurals
        return word
    if word.endswith("ies") and len(word) > 4:
        return word[:-1] if word[:-1] in IE_SINGULARS else word[:-3] + "y"
    if word.endswith("ves"):  # gloves, stoves, olives, waves (the -f ones are irregulars above)
        return word[:-1]
    if word.endswith(("sses", "shes", "xes", "zzes")):
        return word[:-2]
    if word.endswith("ches"):
        return word[:-1] if word[:-1] in CHE_SINGULARS else word[:-2]
    if word.endswith("s"):
        return word[:-1]
    return word


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
        self._tagger, stop = load_nltk_resources()
        self.stopwords = frozenset(stop)
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
        """Fix two tagger habits before noun phrases are read.

        - The first word of a :data:`KNOWN_COMPOUNDS` name ("*hot* dog") becomes a noun.
        - A subject followed by a participle is often tagged as an adjective ("a sheep/JJ
          laying/NN in a field"): a JJ word that is not adjective-like, reads as a noun on its own
          and stands before a participle becomes a noun (the participle is then dropped as a head).
        """
        tagged = list(tagged)
        for i in range(len(tagged) - 1):
            (first, first_tag), (second, tag) = tagged[i], tagged[i + 1]
            head = singularize(second) if tag in PLURAL_TAGS or second.endswith("s") else second
            if tag in NOUN_TAGS and f"{first} {head}" in KNOWN_COMPOUNDS:
                tagged[i] = (first, "NN")
            elif (first_tag == "JJ" and _participle(second) and first not in ADJECTIVE_LIKE
                  and self._is_word(first) and self._noun_alone(first)):
                tagged[i] = (first, "NN")
        return tagged

    def _phrases(self, tagged: Sequence[tuple[str, str]]) -> list[str]:
        """Noun phrases of one tagged sentence, in order."""
        tagged = self._retag(tagged)
        runs: list[list[tuple[str, str]]] = []
        current: list[tuple[str, str]] = []
        for token, tag in tagged:
            if tag in NOUN_TAGS and self._is_word(token):
                current.append((token, tag))
            else:
                if current:
                    runs.append(current)
                current = []
        if current:
            runs.append(current)
        phrases = []
        for run in runs:
            phrase = self._compound(run)
            if phrase:
                phrases.extend([phrase] if self.compounds else phrase.split())
        return phrases

    def _acceptable_head(self, token: str) -> bool:
        if token in self.blocklist:
            return False
        if _participle(token):
            return False  # a participle tagged NN: "a boat floating", "sheep grazing", "dog laying"
        return True

    def _compound(self, run: list[tuple[str, str]]) -> str | None:
        run = list(run)
        while run and not self._acceptable_head(run[-1][0]):
            run.pop()  # "street view" -> "street"; "boat floating" -> "boat"
        if not run:
            return None
        # Adjective-like modifiers and blocked words in front of the head are not part of the name.
        modifiers = [t for t, _ in run[:-1]]
        while modifiers and (modifiers[0] in ADJECTIVE_LIKE or modifiers[0] in self.blocklist):
            modifiers.pop(0)
        head, tag = run[-1]
        if tag in PLURAL_TAGS or head.endswith("s"):  # the tagger often calls plurals NN
            head = singularize(head)
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
    """(perceptron tagger, English stopword list), loaded once per process.

    Raises :class:`MissingNltkData` naming the missing resource and the download command.
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
            _resources = (tagger, words)
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
