"""English plural -> singular by rules plus exception lists (plain Python, no data files needed)."""

from __future__ import annotations

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


def plain_singular(word: str) -> str:
    """:func:`singularize` without the plural-only exceptions: "glasses" -> "glass" (for "wine glasses")."""
    word = word.lower()
    if word in INVARIANT and word.endswith("s") and word not in {"series", "species", "news", "scissors"}:
        return word[:-2] if word.endswith(("sses", "shes", "ches", "xes")) else word[:-1]
    return singularize(word)

