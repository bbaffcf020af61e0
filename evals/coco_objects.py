"""Which COCO objects a caption mentions: the 80 categories, their synonyms and multi-word rules.

The lists and rules are Lucid's own (written for this module, in the spirit of CHAIR's, Rohrbach et
al. 2018). Words are lemmatised as nouns by `lemminflect` (its dictionary ships with the wheel:
"women" -> "woman", "knives" -> "knife", "skis" -> "ski", "traffic lights" -> "traffic light"), so
the synonym lists hold base forms only.

Rules, applied left to right on the lemmas (`mentions`):

1. two-word phrases first (`PHRASES`): "hot dog" is a hot dog, not a dog; "teddy bear" not a bear;
   "passenger jet" an airplane, not a person; some phrases name no object at all ("bus stop",
   "train station", "chair lift", "ski slope");
2. a single word from the synonym lists (`SYNONYMS`);
3. "baby" before an animal ("baby elephant") is that animal, not a person;
4. sport words used as modifiers are not balls or skis ("baseball player", "ski jacket"): a word of
   `MODIFIERS` followed by a noun of `MODIFIED` or of the vocabulary is skipped;
5. "orange" next to another colour ("orange and white cat", "bright orange") or before a noun is the
   colour, not the fruit;
6. a word naming the same object as the phrase just before it is one mention ("double decker bus").

Mentions keep duplicates ("a dog and another dog" is two mentions of dog), as CHAIR_i counts them.
"""

from __future__ import annotations

import re
from functools import lru_cache

# the 80 COCO categories (their names in instances_*.json) -> synonyms (base forms); the name itself
# is always a synonym when it is one word
SYNONYMS: dict[str, tuple[str, ...]] = {
    "person": (
        "person",
        "people",
        "man",
        "woman",
        "boy",
        "girl",
        "child",
        "kid",
        "baby",
        "toddler",
        "infant",
        "guy",
        "lady",
        "gentleman",
        "adult",
        "teen",
        "teenager",
        "player",
        "skier",
        "surfer",
        "skateboarder",
        "snowboarder",
        "rider",
        "cyclist",
        "biker",
        "pedestrian",
        "passenger",
        "driver",
        "tourist",
        "spectator",
        "worker",
        "chef",
        "policeman",
        "policewoman",
        "officer",
        "soldier",
        "student",
        "teacher",
        "batter",
        "catcher",
        "umpire",
        "athlete",
        "bride",
        "groom",
        "mother",
        "father",
        "son",
        "daughter",
        "husband",
        "wife",
        "friend",
        "customer",
        "vendor",
        "farmer",
        "cowboy",
        "crowd",
    ),  # fmt: skip
    "bicycle": ("bicycle", "bike", "tricycle"),
    "car": ("car", "automobile", "sedan", "taxi", "cab", "suv", "jeep", "van", "minivan", "hatchback", "convertible"),
    "motorcycle": ("motorcycle", "motorbike", "scooter", "moped"),
    "airplane": ("airplane", "aeroplane", "plane", "jet", "aircraft", "airliner", "jetliner"),
    "bus": ("bus", "minibus"),
    "train": ("train", "locomotive", "tram", "subway", "streetcar"),
    "truck": ("truck", "lorry", "pickup", "firetruck"),
    "boat": (
        "boat",
        "ship",
        "yacht",
        "sailboat",
        "canoe",
        "kayak",
        "ferry",
        "raft",
        "dinghy",
        "speedboat",
        "rowboat",
        "tugboat",
        "catamaran",
        "vessel",
    ),  # fmt: skip
    "traffic light": ("stoplight",),
    "fire hydrant": ("hydrant",),
    "stop sign": (),
    "parking meter": (),
    "bench": ("bench", "pew"),
    "bird": (
        "bird",
        "pigeon",
        "seagull",
        "gull",
        "duck",
        "goose",
        "swan",
        "parrot",
        "owl",
        "eagle",
        "hawk",
        "crow",
        "sparrow",
        "hen",
        "rooster",
        "penguin",
        "flamingo",
        "pelican",
        "heron",
        "finch",
        "dove",
        "songbird",
    ),  # fmt: skip
    "cat": ("cat", "kitten", "kitty"),
    "dog": ("dog", "puppy", "pup", "doggy", "terrier", "poodle", "retriever", "bulldog", "beagle", "labrador"),
    "horse": ("horse", "pony", "foal", "stallion", "mare", "colt"),
    "sheep": ("sheep", "lamb", "ewe", "ram"),
    "cow": ("cow", "cattle", "bull", "calf", "ox", "heifer"),
    "elephant": ("elephant",),
    "bear": ("bear", "grizzly"),
    "zebra": ("zebra",),
    "giraffe": ("giraffe",),
    "backpack": ("backpack", "rucksack", "knapsack"),
    "umbrella": ("umbrella", "parasol"),
    "handbag": ("handbag", "purse"),
    "tie": ("tie", "necktie"),
    "suitcase": ("suitcase", "luggage", "baggage"),
    "frisbee": ("frisbee",),
    "skis": ("ski",),
    "snowboard": ("snowboard",),
    "sports ball": ("ball", "football", "baseball", "basketball", "volleyball", "softball", "soccer"),
    "kite": ("kite",),
    "baseball bat": ("bat",),
    "baseball glove": ("mitt",),
    "skateboard": ("skateboard",),
    "surfboard": ("surfboard", "longboard", "paddleboard"),
    "tennis racket": ("racket", "racquet"),
    "bottle": ("bottle",),
    "wine glass": ("wineglass",),
    "cup": ("cup", "mug", "teacup"),
    "fork": ("fork",),
    "knife": ("knife",),
    "spoon": ("spoon",),
    "bowl": ("bowl",),
    "banana": ("banana",),
    "apple": ("apple",),
    "sandwich": ("sandwich", "burger", "hamburger", "cheeseburger", "sub", "panini", "hoagie"),
    "orange": ("orange",),
    "broccoli": ("broccoli",),
    "carrot": ("carrot",),
    "hot dog": ("hotdog", "frankfurter"),
    "pizza": ("pizza",),
    "donut": ("donut", "doughnut"),
    "cake": ("cake", "cupcake", "cheesecake"),
    "chair": ("chair", "armchair", "stool", "highchair"),
    "couch": ("couch", "sofa", "loveseat", "settee", "futon"),
    "potted plant": ("plant", "houseplant", "flowerpot"),
    "bed": ("bed", "crib", "cot"),
    "dining table": ("table", "desk"),
    "toilet": ("toilet", "urinal"),
    "tv": ("tv", "television", "flatscreen", "monitor"),
    "laptop": ("laptop", "netbook"),
    "mouse": ("mouse",),
    "remote": ("remote", "controller"),
    "keyboard": ("keyboard",),
    "cell phone": ("phone", "cellphone", "smartphone", "iphone", "telephone"),
    "microwave": ("microwave",),
    "oven": ("oven", "stove", "stovetop"),
    "toaster": ("toaster",),
    "sink": ("sink", "washbasin", "basin"),
    "refrigerator": ("refrigerator", "fridge", "freezer"),
    "book": ("book", "novel", "textbook", "paperback"),
    "clock": ("clock",),
    "vase": ("vase",),
    "scissors": ("scissors", "shears"),
    "teddy bear": ("teddy",),
    "hair drier": ("hairdryer", "hairdrier"),
    "toothbrush": ("toothbrush",),
}

# (first, second) lemma pair -> category, or None: the phrase names no COCO object
PHRASES: dict[tuple[str, str], str | None] = {
    ("traffic", "light"): "traffic light",
    ("traffic", "signal"): "traffic light",
    ("stop", "light"): "traffic light",
    ("fire", "hydrant"): "fire hydrant",
    ("stop", "sign"): "stop sign",
    ("parking", "meter"): "parking meter",
    ("teddy", "bear"): "teddy bear",
    ("stuffed", "animal"): "teddy bear",
    ("hot", "dog"): "hot dog",
    ("tennis", "racket"): "tennis racket",
    ("tennis", "racquet"): "tennis racket",
    ("tennis", "ball"): "sports ball",
    ("soccer", "ball"): "sports ball",
    ("beach", "ball"): "sports ball",
    ("baseball", "bat"): "baseball bat",
    ("baseball", "glove"): "baseball glove",
    ("baseball", "mitt"): "baseball glove",
    ("catcher", "mitt"): "baseball glove",
    ("wine", "glass"): "wine glass",
    ("champagne", "glass"): "wine glass",
    ("cell", "phone"): "cell phone",
    ("mobile", "phone"): "cell phone",
    ("dining", "table"): "dining table",
    ("coffee", "table"): "dining table",
    ("potted", "plant"): "potted plant",
    ("house", "plant"): "potted plant",
    ("flower", "pot"): "potted plant",
    ("hair", "drier"): "hair drier",
    ("hair", "dryer"): "hair drier",
    ("blow", "dryer"): "hair drier",
    ("sports", "ball"): "sports ball",
    ("motor", "bike"): "motorcycle",
    ("dirt", "bike"): "motorcycle",
    ("passenger", "jet"): "airplane",
    ("passenger", "plane"): "airplane",
    ("passenger", "train"): "train",
    ("passenger", "bus"): "bus",
    ("fire", "truck"): "truck",
    ("fire", "engine"): "truck",
    ("pickup", "truck"): "truck",
    ("double", "decker"): "bus",
    ("remote", "control"): "remote",
    ("microwave", "oven"): "microwave",
    ("computer", "mouse"): "mouse",
    ("computer", "monitor"): "tv",
    ("computer", "keyboard"): "keyboard",
    ("toilet", "seat"): "toilet",
    ("toilet", "bowl"): "toilet",
    ("bow", "tie"): "tie",
    ("flying", "disc"): "frisbee",
    ("clock", "tower"): "clock",
    ("surf", "board"): "surfboard",
    ("skate", "board"): "skateboard",
    ("tooth", "brush"): "toothbrush",
    ("suit", "case"): "suitcase",
    ("hand", "bag"): "handbag",
    ("coffee", "cup"): "cup",
    ("police", "car"): "car",
    ("train", "car"): "train",
    ("jet", "ski"): "boat",
    # phrases that name no COCO object
    ("bus", "stop"): None,
    ("bus", "station"): None,
    ("bus", "lane"): None,
    ("train", "station"): None,
    ("train", "track"): None,
    ("train", "platform"): None,
    ("railroad", "track"): None,
    ("chair", "lift"): None,
    ("ski", "lift"): None,
    ("ski", "slope"): None,
    ("ski", "pole"): None,
    ("ski", "resort"): None,
    ("ski", "lodge"): None,
    ("table", "cloth"): None,
    ("orange", "juice"): None,
    ("apple", "juice"): None,
}

# sport words that are modifiers before a noun ("baseball player", "ski jacket", "tennis court")
MODIFIERS = frozenset({"baseball", "football", "basketball", "volleyball", "softball", "soccer", "ski", "tennis"})
MODIFIED = frozenset(
    "player game match field court pitch stadium team fan practice uniform jersey shirt jacket coat hat cap helmet "
    "boot shoe sock suit goggles glove pant short outfit gear equipment lesson class trail slope hill area run "
    "race event league club net".split()
)
COLOURS = frozenset(
    "red orange yellow green blue purple pink white black brown gray grey silver gold tan beige bright dark light "
    "pale striped".split()
)
ANIMALS = frozenset({"bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe"})
_CONNECTORS = frozenset({"and", "or", "-", "&"})

CATEGORIES: tuple[str, ...] = tuple(SYNONYMS)
_TOKEN = re.compile(r"[a-z]+|-|&")


@lru_cache(maxsize=65536)
def lemma(word: str) -> str:
    """A word's noun lemma ("women" -> "woman"); words lemminflect does not know are kept."""
    from lemminflect import getLemma

    out = getLemma(word, upos="NOUN")
    return out[0] if out else word


def _single_index() -> dict[str, str]:
    idx: dict[str, str] = {}
    for cat, words in SYNONYMS.items():
        for w in ((cat,) if " " not in cat else ()) + words:
            idx[lemma(w)] = cat
    return idx


_SINGLE: dict[str, str] = {}


def _single() -> dict[str, str]:
    if not _SINGLE:
        _SINGLE.update(_single_index())
    return _SINGLE


def mentions(text: str) -> list[str]:
    """COCO categories mentioned in `text`, in order, with duplicates (see the module rules)."""
    lem = [t if t in ("-", "&") else lemma(t) for t in _TOKEN.findall(text.lower().replace("\u2019", "'"))]
    single = _single()
    out: list[str] = []
    last_phrase: str | None = None
    i, n = 0, len(lem)
    while i < n:
        w, nxt = lem[i], (lem[i + 1] if i + 1 < n else None)
        j = i + 2 if nxt == "-" and i + 2 < n else i + 1  # "hot-dog", "double-decker": one phrase
        if j < n and (w, lem[j]) in PHRASES:
            cat = PHRASES[(w, lem[j])]
            if cat is not None:
                out.append(cat)
            last_phrase = cat
            i = j + 1
            continue
        if w in ("-", "&"):
            i += 1
            continue
        cat = single.get(w)
        if cat is None:
            last_phrase = None
            i += 1
            continue
        if last_phrase == cat and i > 0:  # "double decker bus": the phrase already named it
            last_phrase = None
            i += 1
            continue
        last_phrase = None
        if w == "baby" and nxt is not None and single.get(nxt) in ANIMALS:
            i += 1
            continue
        if w in MODIFIERS and nxt is not None and (nxt in MODIFIED or nxt in single):
            i += 1
            continue
        if w == "orange" and _is_colour(lem, i):
            i += 1
            continue
        out.append(cat)
        i += 1
    return out


def _is_colour(lem: list[str], i: int) -> bool:
    """'orange' at i is the colour: a colour word next to it (over and/or/-), or a noun after it."""

    def neighbour(step: int) -> str | None:
        j = i + step
        if 0 <= j < len(lem) and lem[j] in _CONNECTORS:
            j += step
        return lem[j] if 0 <= j < len(lem) else None

    before, after = neighbour(-1), neighbour(1)
    if (before in COLOURS) or (after in COLOURS):
        return True
    nxt = lem[i + 1] if i + 1 < len(lem) else None
    return nxt is not None and (nxt in _single() or nxt in MODIFIED or nxt in _NOUNS_AFTER_COLOUR)


_NOUNS_AFTER_COLOUR = frozenset(
    "vest cone sky sunset wall flower stripe top dress sweater scarf light sign paint background frame "
    "umbrella kite boat hair fur coat".split()
)
