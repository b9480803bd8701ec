"""CHAIR (Rohrbach et al., EMNLP 2018): which objects a caption mentions, and which are not there.

Two vocabularies share one matcher interface:

- `COCO`: the 80 COCO instance classes, each with synonyms (the idea of CHAIR's synonym list,
  written here: "man", "woman", "kid", "people" ... mean person; "puppy", "terrier" ... mean
  dog; "sofa" means couch), plural forms made by `plural` (regular rules plus irregulars:
  men, women, children, people, knives, mice, geese, oxen, calves, sheep, skis, scissors ...),
  multi-word names ("traffic light", "fire hydrant", "hot dog", "teddy bear", "cell phone",
  also written with a hyphen), and a few phrases that are not the object their words suggest
  ("train tracks", "bus stop", "ski slope": nothing; "baby elephant": elephant, not a person;
  "toilet seat": toilet, not a chair; "bow tie": tie).
- `TESTBED`: the 16 testbed categories and their synonyms, matched by `testbed.world`.

Matching is case-insensitive, on whole words, longest phrase first ("hot dog" is one mention
of hot dog, never also a dog). Singular "orange" counts as the fruit only when it is not used
as a colour: it is a colour (no mention) when the next word is a colour word ("orange and
white cat"), "colored" or a hyphen, or any other word that is not a function word / verb /
"slice(s)"-like continuation ("an orange cat", "an orange shirt"); it is the fruit before
punctuation, at the end, or before words like "on", "in", "and", "is", "sitting", "slices"
("an orange on the table", "a bowl with an apple and an orange."). "oranges" is always fruit.

NEGATION RULE (`NEGATION_RULE`, applied to both vocabularies): a mention does not count when
it is inside the scope of a preceding negation cue in the same clause.

- cues: no, not, without, nor, neither, none, never, cannot and every n't contraction
  (isn't, aren't, doesn't, don't, can't ..., also written without the apostrophe);
- the scope starts after the cue and reaches the first object mention, as long as at most
  `MAX_GAP` (1) word that is not a filler word stands between them. Filler words are
  articles and quantifiers (a, the, any, other, single ...), colour and size adjectives, and
  existence/appearance verbs ("be", "appear", "seem", "see", "visible", "have", "sign of").
  So "no cat", "without a dog", "there is no knife", "there doesn't seem to be any dog",
  "no sign of a cat", "not holding a dog" are negated mentions;
- the scope ends at clause punctuation (. , ; : ! ? brackets), at a preposition or a
  conjunction other than "or" (in, on, with, near, and, but, which ...), and right after the
  negated mention; only "or" right after a negated mention carries it on ("no cats or
  dogs": both negated; "neither a cat nor a dog": both, since "nor" is a cue itself);
- so "there is no dog, but a cat", "no people in the car", "a man without a hat holding a
  dog", "a table without forks and a knife" keep the cat, the car, the dog and the knife.
- Negation that follows the noun ("the dog is absent") is not detected; comma lists under
  one cue ("no cats, dogs or birds") negate only the first item.

Counting (`chair_scores`): each caption's mentioned objects are its DISTINCT non-negated
object categories (a category mentioned three times counts once; CHAIR_I is over these
per-caption unique objects, like the paper's per-caption object sets).
- CHAIR_S = captions with >= 1 hallucinated object / captions
- CHAIR_I = hallucinated (caption, object) pairs / mentioned (caption, object) pairs
- recall  = mentioned ground-truth (caption, object) pairs / ground-truth pairs
- mean_len = mean number of whitespace-separated words per caption
Ground truth is whatever set each item carries (for COCO: the instance annotations, plus the
objects of the reference captions when `--captions` is given, as in the paper).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Optional

# --- the 80 COCO classes --------------------------------------------------------------------
# class name (as in instances_*.json) -> other singular words or phrases meaning that class.
# Plurals are generated; forms that are already plural or uncountable are listed as they are.
COCO_SYNONYMS: dict[str, tuple[str, ...]] = {
    "person": (
        "people", "man", "woman", "boy", "girl", "child", "kid", "baby", "toddler", "infant",
        "adult", "teenager", "teen", "youngster", "lady", "gentleman", "guy", "dude",
        "mother", "father", "mom", "dad", "son", "daughter", "brother", "sister",
        "grandmother", "grandfather", "husband", "wife", "bride", "groom",
        "rider", "biker", "cyclist", "bicyclist", "motorcyclist", "driver", "passenger",
        "pedestrian", "commuter", "traveler", "traveller", "tourist", "spectator", "onlooker",
        "player", "athlete", "skier", "snowboarder", "skateboarder", "skater", "surfer",
        "kiteboarder", "windsurfer", "swimmer", "runner", "jogger", "hiker", "climber",
        "pitcher", "batter", "catcher", "umpire", "referee", "golfer",
        "worker", "workman", "chef", "baker", "waiter", "waitress", "vendor", "seller",
        "shopper", "customer", "clerk", "farmer", "cowboy", "cowgirl", "jockey", "soldier",
        "officer", "policeman", "policewoman", "cop", "fireman", "firefighter", "doctor", "nurse",
        "patient", "student", "teacher", "businessman", "businesswoman", "police officer",
    ),
    "bicycle": ("bike", "unicycle", "tricycle", "trike", "minibike", "mountain bike"),
    "car": (
        "automobile", "auto", "van", "minivan", "sedan", "suv", "hatchback", "cab", "taxi",
        "taxicab", "jeep", "coupe", "limo", "limousine", "convertible", "police car",
    ),
    "motorcycle": ("motorbike", "motor bike", "motor cycle", "scooter", "moped", "dirt bike"),
    "airplane": (
        "plane", "aeroplane", "air plane", "jet", "jetliner", "airliner", "aircraft", "airbus",
        "biplane", "seaplane", "monoplane", "propeller plane", "passenger jet", "passenger plane",
    ),
    "bus": ("minibus", "trolley", "trolleybus", "double decker", "passenger bus", "school bus"),
    "train": ("locomotive", "tram", "tramway", "streetcar", "caboose", "passenger train", "railcar"),
    "truck": (
        "pickup", "pickup truck", "lorry", "hauler", "firetruck", "fire truck", "fire engine",
        "semi truck", "tow truck", "dump truck", "tractor trailer", "truck bed",
    ),
    "boat": (
        "ship", "liner", "sailboat", "motorboat", "dinghy", "powerboat", "speedboat", "canoe",
        "skiff", "yacht", "kayak", "catamaran", "pontoon", "houseboat", "vessel", "rowboat",
        "trawler", "ferryboat", "ferry", "watercraft", "tugboat", "schooner", "barge",
        "paddleboat", "lifeboat", "freighter", "steamboat", "riverboat", "battleship",
        "steamship", "gondola", "raft", "passenger ship",
    ),
    "traffic light": (
        "traffic signal", "stop light", "stoplight", "street light", "streetlight", "signal light",
    ),
    "fire hydrant": ("hydrant", "fireplug"),
    "stop sign": (),
    "parking meter": ("meter",),
    "bench": ("pew", "park bench"),
    "bird": (
        "ostrich", "owl", "seagull", "gull", "goose", "duck", "duckling", "parakeet", "falcon",
        "robin", "pelican", "waterfowl", "heron", "hummingbird", "mallard", "finch", "pigeon",
        "dove", "sparrow", "seabird", "osprey", "blackbird", "fowl", "shorebird", "woodpecker",
        "egret", "chickadee", "quail", "bluebird", "kingfisher", "buzzard", "swan", "bluejay",
        "blue jay", "flamingo", "cormorant", "parrot", "loon", "gosling", "waterbird",
        "pheasant", "rooster", "hen", "chick", "sandpiper", "crow", "raven",
        "oriole", "warbler", "magpie", "peacock", "cockatiel", "lorikeet", "puffin", "vulture",
        "condor", "macaw", "peafowl", "cockatoo", "songbird", "eagle", "hawk", "penguin",
    ),
    "cat": ("kitten", "kitty", "feline", "tabby", "kitty cat"),
    "dog": (
        "puppy", "pup", "doggy", "doggie", "canine", "hound", "beagle", "chihuahua", "schnauzer",
        "dachshund", "rottweiler", "pitbull", "pit bull", "collie", "pug", "terrier", "poodle",
        "labrador", "doberman", "mutt", "spaniel", "bulldog", "sheepdog", "german shepherd",
        "weimaraner", "corgi", "greyhound", "retriever", "husky", "dalmatian", "mastiff", "whippet",
    ),
    "horse": (
        "pony", "colt", "foal", "mare", "stallion", "racehorse", "equine", "palomino", "mustang",
        "clydesdale", "bronco",
    ),
    "sheep": ("lamb", "ram", "ewe", "goat"),
    "cow": ("cattle", "ox", "calf", "bull", "heifer", "buffalo", "bison", "zebu", "longhorn", "holstein"),
    "elephant": ("pachyderm",),
    "bear": ("grizzly", "polar bear", "grizzly bear", "black bear", "brown bear", "panda"),
    "zebra": (),
    "giraffe": (),
    "backpack": ("knapsack", "rucksack", "back pack", "book bag", "bookbag"),
    "umbrella": ("parasol", "sunshade"),
    "handbag": ("purse", "hand bag", "pocketbook", "wallet", "briefcase", "shoulder bag", "tote bag"),
    "tie": ("necktie", "bow tie", "bowtie"),
    "suitcase": ("suit case", "luggage", "baggage", "carry on"),
    "frisbee": ("flying disc", "frisbie"),
    "skis": ("ski",),
    "snowboard": ("snow board",),
    "sports ball": (
        "ball", "soccer ball", "tennis ball", "baseball ball", "basketball ball", "volleyball ball",
        "beach ball", "softball ball",
    ),
    "kite": (),
    "baseball bat": ("bat", "softball bat", "cricket bat"),
    "baseball glove": ("baseball mitt", "mitt", "catcher's mitt", "catchers mitt", "softball glove"),
    "skateboard": ("skate board", "longboard skateboard"),
    "surfboard": ("surf board", "longboard", "skimboard", "shortboard", "wakeboard", "boogie board", "bodyboard", "paddleboard", "paddle board"),
    "tennis racket": ("racket", "racquet", "tennis racquet"),
    "bottle": ("flask", "water bottle", "wine bottle", "beer bottle"),
    "wine glass": ("wineglass", "champagne glass", "champagne flute"),
    "cup": ("mug", "teacup", "coffee cup", "tea cup"),
    "fork": (),
    "knife": ("pocketknife", "pocket knife", "steak knife", "butter knife", "cleaver"),
    "spoon": ("teaspoon", "tablespoon", "ladle"),
    "bowl": ("soup bowl", "salad bowl"),
    "banana": (),
    "apple": (),
    "sandwich": ("burger", "hamburger", "cheeseburger", "sub sandwich", "panini", "wrap sandwich", "hoagie"),
    "orange": ("tangerine", "clementine", "mandarin"),
    "broccoli": ("broccolis", "brocolli"),
    "carrot": (),
    "hot dog": ("hotdog", "frankfurter", "wiener", "bratwurst", "chili dog", "corn dog"),
    "pizza": ("pizza pie", "pizza slice"),
    "donut": ("doughnut", "bagel", "cruller"),
    "cake": ("cheesecake", "cupcake", "shortcake", "coffeecake", "pancake", "birthday cake", "wedding cake"),
    "chair": ("seat", "stool", "armchair", "highchair", "high chair", "rocking chair", "lawn chair"),
    "couch": ("sofa", "recliner", "futon", "loveseat", "love seat", "settee", "chesterfield", "divan"),
    "potted plant": ("houseplant", "house plant", "pot plant", "plant pot", "flowerpot", "flower pot", "potted flower"),
    "bed": ("bunk bed", "crib", "cot", "mattress"),
    "dining table": ("table", "desk", "kitchen table", "coffee table", "picnic table"),
    "toilet": ("urinal", "commode", "lavatory", "potty", "toilet bowl", "toilet seat"),
    "tv": ("television", "televison", "tv set", "monitor", "computer monitor", "flat screen", "flatscreen"),
    "laptop": ("computer", "laptop computer", "notebook computer", "netbook", "macbook", "pc"),
    "mouse": ("computer mouse",),
    "remote": ("remote control", "controller", "game controller", "wii remote", "wii controller", "wiimote", "clicker"),
    "keyboard": ("computer keyboard",),
    "cell phone": (
        "cellphone", "phone", "mobile phone", "smartphone", "smart phone", "iphone", "telephone",
    ),
    "microwave": ("microwave oven",),
    "oven": ("stove", "stovetop", "stove top", "cooker"),
    "toaster": ("toaster oven",),
    "sink": ("basin", "washbasin"),
    "refrigerator": ("fridge", "freezer", "icebox"),
    "book": ("novel", "textbook", "paperback", "hardcover", "notebook"),
    "clock": ("clock tower", "alarm clock"),
    "vase": ("flower vase",),
    "scissors": ("shears", "pair of scissors"),
    "teddy bear": ("teddybear", "teddy", "stuffed bear", "stuffed animal", "plush bear"),
    "hair drier": ("hair dryer", "hairdryer", "hairdrier", "blow dryer", "blowdryer", "blow drier"),
    "toothbrush": ("tooth brush",),
}
COCO_CLASSES: tuple[str, ...] = tuple(COCO_SYNONYMS)
assert len(COCO_CLASSES) == 80

# Phrases that contain an object word but do not show that object (None), or show another
# object than their first word suggests. They win by being longer.
COCO_PHRASES: dict[str, Optional[str]] = {
    "train track": None, "train tracks": None, "train station": None, "train platform": None,
    "bus stop": None, "bus station": None, "bus shelter": None,
    "ski slope": None, "ski slopes": None, "ski lift": None, "ski lifts": None, "ski resort": None,
    "ski pole": None, "ski poles": None, "ski area": None, "ski run": None, "ski trail": None,
    "ski boot": None, "ski boots": None, "ski jacket": None, "ski suit": None, "ski goggles": None,
    "toilet paper": None, "table cloth": None, "tablecloth": None, "table top": None, "tabletop": None,
    "cell tower": None, "flower bed": None, "phone booth": None, "phone pole": None,
    "parking lot": None, "car park": None, "car wash": None, "dog park": None, "dog house": None,
    "dog leash": None, "cat food": None, "dog food": None, "bird feeder": None, "bird house": None,
    "birdhouse": None, "bird cage": None, "birdcage": None, "horse drawn": None,
    "cake stand": None, "pizza box": None, "pizza boxes": None, "pizza cutter": None,
    "apple logo": None, "sink top": None, "time clock": None,
    "kite surfing": None, "kite boarding": None, "kiteboarding": None, "kitesurfing": None,
    "baseball player": "person", "baseball players": "person", "tennis player": "person",
    "tennis players": "person", "soccer player": "person", "soccer players": "person",
    "man made": None, "man-made": None,
    "back seat": None, "front seat": None, "passenger seat": None, "driver seat": None,
    "driver's seat": None, "car seat": "car", "bike seat": "bicycle", "bicycle seat": "bicycle",
    "motorcycle seat": "motorcycle",
    "its mother": None, "its baby": None, "its babies": None, "its calf": None, "its cub": None,
}
ANIMAL_CLASSES = ("bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe")
ANIMAL_PREFIXES = ("baby", "adult", "mother", "father", "mama", "papa")  # person words before an animal

COLOUR_WORDS = frozenset(
    "red orange yellow green blue purple pink white black brown gray grey silver gold golden "
    "beige tan maroon navy teal turquoise violet cream dark light bright pale".split()
)
# after singular "orange", these mean the fruit (otherwise: the colour of the next noun)
_ORANGE_FRUIT_NEXT = frozenset(
    "and or on in with is are was were sits sitting lying laying rests resting next near beside "
    "by of that which from at to under over above below inside into onto between among behind "
    "slice slices wedge wedges half halves segment segments peel peels tree trees has have "
    "cut sliced peeled placed here there too also".split()
)

# --- plural forms ---------------------------------------------------------------------------
_IRREGULAR = {
    "person": "people", "child": "children", "mouse": "mice", "goose": "geese", "ox": "oxen",
    "foot": "feet", "tooth": "teeth", "knife": "knives", "pocketknife": "pocketknives",
    "calf": "calves", "wife": "wives", "leaf": "leaves", "loaf": "loaves", "shelf": "shelves",
    "wolf": "wolves", "half": "halves", "buffalo": "buffaloes", "tomato": "tomatoes",
    "potato": "potatoes", "cactus": "cacti", "bus": "buses", "minibus": "minibuses",
    "trolleybus": "trolleybuses", "doggie": "doggies", "cookie": "cookies", "veggie": "veggies",
    "kitty": "kitties", "puppy": "puppies", "pony": "ponies", "lady": "ladies", "baby": "babies",
}
_UNCHANGED = frozenset(
    "sheep deer fish bison moose cattle people skis scissors shears luggage baggage broccoli "
    "broccolis brocolli aircraft watercraft series species police mice geese oxen children "
    "men women teeth feet".split()
)
_NOT_MAN = frozenset(("human", "shaman", "german", "ottoman", "caiman"))


def plural(phrase: str) -> str:
    """The plural of a noun phrase: its last word inflected (irregulars, -man, -es, -ies, -s)."""
    words = phrase.split(" ")
    last = words[-1]
    if last in _UNCHANGED:
        pl = last
    elif last in _IRREGULAR:
        pl = _IRREGULAR[last]
    elif last.endswith("man") and last not in _NOT_MAN:
        pl = last[:-3] + "men"
    elif last.endswith(("s", "x", "z", "ch", "sh")):
        pl = last + "es"
    elif last.endswith("y") and len(last) > 1 and last[-2] not in "aeiou":
        pl = last[:-1] + "ies"
    else:
        pl = last + "s"
    return " ".join(words[:-1] + [pl])


# --- vocabularies ---------------------------------------------------------------------------

def _phrase_regex(forms: Iterable[str]) -> re.Pattern:
    # Longest first: at any position the regex takes the first alternative that matches.
    alts = sorted(set(forms), key=lambda f: (-len(f), f))
    parts = [r"[\s\-]+".join(re.escape(w) for w in re.split(r"[\s\-]+", a)) for a in alts]
    return re.compile(r"\b(?:" + "|".join(parts) + r")\b")


def _norm_form(s: str) -> str:
    return re.sub(r"[\s\-]+", " ", s)


class Vocabulary:
    """Object words of one label set; `spans(lowered_text)` -> [(start, end, category)]."""

    name: str = ""
    categories: tuple[str, ...] = ()

    def spans(self, text: str) -> list[tuple[int, int, str]]:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<Vocabulary {self.name}: {len(self.categories)} categories>"


class PhraseVocabulary(Vocabulary):
    """Categories, each with surface forms (singular and plural), plus blocking phrases."""

    def __init__(self, name: str, synonyms: Mapping[str, Iterable[str]],
                 phrases: Optional[Mapping[str, Optional[str]]] = None, orange_rule: bool = False):
        self.name = name
        self.categories = tuple(synonyms)
        lookup: dict[str, Optional[str]] = {}

        def add(form: str, cat: Optional[str]) -> None:
            form = _norm_form(form.lower().strip())
            if lookup.get(form, cat) != cat:
                raise ValueError(f"surface form {form!r} means both {lookup[form]!r} and {cat!r}")
            lookup[form] = cat

        for cat, syns in synonyms.items():
            for s in (cat, *syns):
                add(s, cat)
                add(plural(s.lower()), cat)
        for phrase, cat in (phrases or {}).items():
            add(phrase, cat)
            if cat is not None:
                add(plural(phrase.lower()), cat)
        self.lookup = lookup
        self.forms_by_category: dict[str, list[str]] = {c: [] for c in self.categories}
        for f, c in lookup.items():
            if c is not None:
                self.forms_by_category[c].append(f)
        self.orange_rule = orange_rule and "orange" in self.categories
        self._re = _phrase_regex(lookup)

    def spans(self, text: str) -> list[tuple[int, int, str]]:
        out = []
        for m in self._re.finditer(text):
            cat = self.lookup[_norm_form(m.group(0))]
            if cat is None:
                continue
            if self.orange_rule and m.group(0) == "orange" and _orange_is_colour(text, m.end()):
                continue
            out.append((m.start(), m.end(), cat))
        return out


def _orange_is_colour(text: str, end: int) -> bool:
    rest = text[end:]
    if re.match(r"\s*-", rest):  # orange-colored, orange-and-white
        return True
    words = re.findall(r"[a-z']+|[^\sa-z']", rest[:60])
    if not words or not words[0][0].isalpha():
        return False  # end of text or punctuation: the fruit
    w1 = words[0]
    if w1 in COLOUR_WORDS or w1 in ("colored", "coloured", "color", "colour", "tinted", "striped", "ish"):
        return True
    if w1 in ("and", "or") and len(words) > 1 and words[1] in COLOUR_WORDS:
        return True  # "orange and white cat"
    return w1 not in _ORANGE_FRUIT_NEXT


class TestbedVocabulary(Vocabulary):
    """The testbed's 16 categories, matched by `vhr_edge.testbed.world.mention_spans`."""

    __test__ = False  # not a pytest class

    def __init__(self):
        from ..testbed import world

        self.name = "testbed"
        self.categories = world.NAMES
        self._spans = world.mention_spans
        self.forms_by_category = {c: list(world.surface_forms(c)) for c in world.NAMES}

    def spans(self, text: str) -> list[tuple[int, int, str]]:
        return self._spans(text)


def _coco_phrases() -> dict[str, Optional[str]]:
    """COCO_PHRASES plus "baby/adult/mother... {animal}" -> the animal (not a person)."""
    phrases: dict[str, Optional[str]] = dict(COCO_PHRASES)
    for cls in ANIMAL_CLASSES:
        forms = {cls, plural(cls)} | {f for s in COCO_SYNONYMS[cls] for f in (s, plural(s))}
        for form in sorted(forms):
            for p in ANIMAL_PREFIXES:
                phrases.setdefault(f"{p} {form}", cls)
    for p in ANIMAL_PREFIXES:
        phrases.setdefault(f"{p} animal", None)
        phrases.setdefault(f"{p} animals", None)
    return phrases


def coco_vocabulary(extra: Iterable[str] = ()) -> PhraseVocabulary:
    """The 80 COCO classes, plus `extra` category names (matched as written and plural).
    A COCO synonym that equals an extra name gives way to it ("ball" as its own label)."""
    extra = [e.lower() for e in dict.fromkeys(extra) if e.lower() not in COCO_SYNONYMS]
    taken = {f for n in extra for f in (_norm_form(n), _norm_form(plural(n)))}
    syn: dict[str, tuple[str, ...]] = {
        c: tuple(s for s in ss if _norm_form(s) not in taken and _norm_form(plural(s)) not in taken)
        for c, ss in COCO_SYNONYMS.items()
    }
    syn.update({n: () for n in extra})
    phrases = {p: c for p, c in _coco_phrases().items() if _norm_form(p) not in taken}
    return PhraseVocabulary("coco+" if extra else "coco", syn, phrases, orange_rule=True)


COCO = coco_vocabulary()
_TESTBED: Optional[TestbedVocabulary] = None


def testbed_vocabulary() -> TestbedVocabulary:
    global _TESTBED
    if _TESTBED is None:
        _TESTBED = TestbedVocabulary()
    return _TESTBED


testbed_vocabulary.__test__ = False  # type: ignore[attr-defined]


def vocabulary_for(category_names: Iterable[str]) -> Vocabulary:
    """The vocabulary for a label set: all testbed names -> the testbed vocabulary; all COCO
    names -> COCO; otherwise COCO plus the other names (singular and plural, no synonyms)."""
    names = [n.lower() for n in category_names]
    tb = testbed_vocabulary()
    if names and set(names) <= set(tb.categories):
        return tb
    unknown = [n for n in names if n not in COCO_SYNONYMS]
    return coco_vocabulary(unknown) if unknown else COCO


# --- negation -------------------------------------------------------------------------------

NEGATION_CUES = frozenset(
    "no not without nor neither none never cannot isnt arent wasnt werent dont doesnt didnt "
    "cant couldnt wont wouldnt hasnt havent hadnt aint shouldnt".split()
)
# Words that do not move a mention out of a cue's scope ("there doesn't seem to be any dog").
NEGATION_FILLER = frozenset(
    "a an the any some single other another more additional further such kind kinds sort sorts "
    "type types sign signs trace traces evidence hint of to be been being is are was were am "
    "appear appears appeared appearing seem seems seemed seemingly see seen visible present "
    "there here actual real obvious apparent clear clearly specific particular own his her "
    "their its my your our one two three four five several many much few large small big little "
    "tiny huge young old adult baby have has had contain contains containing include includes "
    "including show shows showing feature features featuring actually really even".split()
) | COLOUR_WORDS
# Words (besides clause punctuation) that end a cue's scope: prepositions and conjunctions.
NEGATION_BOUNDARY = frozenset(
    "and but while although though however whereas yet instead except besides so because which "
    "who whom whose that where when as than then if unless with in on at near next behind "
    "beside besides by under over above below beneath inside outside around along across from "
    "into onto for against between among through toward towards atop within upon via".split()
)
MAX_GAP = 1  # non-filler words allowed between a cue and the mention it negates
_TOKEN_RE = re.compile(r"[a-z0-9]+(?:'[a-z]+)?|[.,;:!?()\[\]]")
_CLAUSE_PUNCT = frozenset(".,;:!?()[]")

NEGATION_RULE = (
    "A mention is negated (not counted) when a negation cue (no, not, without, nor, neither, "
    "none, never, cannot, any n't contraction) precedes it in the same clause with at most "
    f"{MAX_GAP} non-filler word between them (fillers: articles, quantifiers, colour/size "
    "adjectives, be/appear/seem/see/have/visible/sign of). The scope ends at clause punctuation, "
    "at a preposition or conjunction other than 'or', and after the negated mention unless "
    "'or' follows ('no cats or dogs' negates both)."
)


def _is_cue(tok: str) -> bool:
    return tok in NEGATION_CUES or tok.endswith("n't")


def _lower(text: str) -> str:
    """Lower case with the same length (so offsets match the input); curly apostrophes -> '."""
    out = []
    for ch in text:
        lo = ch.lower()
        out.append(lo if len(lo) == 1 else ch)
    return "".join(out).replace("\u2019", "'").replace("\u2018", "'")


@dataclass(frozen=True)
class Mention:
    start: int
    end: int
    text: str  # the words as written
    category: str
    negated: bool


def find_mentions(text: str, vocab: Vocabulary = COCO) -> list[Mention]:
    """Every object mention in `text`, in order, each marked negated or not (NEGATION_RULE)."""
    low = _lower(text)
    spans = sorted(vocab.spans(low))
    tokens = [(m.start(), m.end(), m.group(0)) for m in _TOKEN_RE.finditer(low)]
    out: list[Mention] = []
    open_, gap, after_neg = False, 0, False
    si = 0
    ti = 0
    while ti < len(tokens) or si < len(spans):
        # the next event: a mention span (if it starts at or before the next token) or a token
        if si < len(spans) and (ti >= len(tokens) or spans[si][0] <= tokens[ti][0]):
            s, e, cat = spans[si]
            si += 1
            negated = open_ and gap <= MAX_GAP
            out.append(Mention(s, e, text[s:e], cat, negated))
            open_, after_neg = False, negated
            while ti < len(tokens) and tokens[ti][0] < e:  # skip the mention's own tokens
                ti += 1
            continue
        tok = tokens[ti][2]
        ti += 1
        if tok in _CLAUSE_PUNCT:
            open_, after_neg = False, False
        elif _is_cue(tok):
            open_, gap, after_neg = True, 0, False
        elif after_neg and tok == "or":
            open_, gap, after_neg = True, 0, False
        elif tok in NEGATION_BOUNDARY or tok == "or":
            open_, after_neg = False, False
        else:
            after_neg = False
            if open_ and tok not in NEGATION_FILLER:
                gap += 1
                if gap > MAX_GAP:
                    open_ = False
    return out


def caption_objects(text: str, vocab: Vocabulary = COCO) -> tuple[list[str], list[str]]:
    """(mentioned, negated): distinct categories in order of first mention. A category with
    any non-negated mention is mentioned; `negated` lists those only ever negated."""
    ms = find_mentions(text, vocab)
    mentioned = list(dict.fromkeys(m.category for m in ms if not m.negated))
    negated = [c for c in dict.fromkeys(m.category for m in ms if m.negated) if c not in mentioned]
    return mentioned, negated


# --- scores ---------------------------------------------------------------------------------

@dataclass
class ChairScores:
    per_caption: list[dict]  # {"mentioned", "hallucinated", "negated", "hit", "n_gt", "words"}
    summary: dict = field(default_factory=dict)  # {"n", "chair_s", "chair_i", "recall", "mean_len"}


def score_caption(caption: str, gt: Iterable[str], vocab: Vocabulary = COCO) -> dict:
    """One caption against its ground-truth category set."""
    gt_set = set(gt)
    mentioned, negated = caption_objects(caption, vocab)
    return {
        "mentioned": mentioned,
        "hallucinated": [c for c in mentioned if c not in gt_set],
        "negated": negated,
        "hit": [c for c in mentioned if c in gt_set],
        "n_gt": len(gt_set),
        "words": len(caption.split()),
    }


def _item(it) -> tuple[str, Iterable[str]]:
    if isinstance(it, Mapping):
        cap = it.get("caption", it.get("text"))
        gt = it.get("gt_objects", it.get("gt"))
        if cap is None or gt is None:
            raise KeyError("each item needs 'caption' and 'gt_objects'")
        return cap, gt
    cap, gt = it
    return cap, gt


def summarize(per_caption: list[dict]) -> dict:
    n = len(per_caption)
    mentions = sum(len(p["mentioned"]) for p in per_caption)
    hall = sum(len(p["hallucinated"]) for p in per_caption)
    n_gt = sum(p["n_gt"] for p in per_caption)
    hit = sum(len(p["hit"]) for p in per_caption)
    return {
        "n": n,
        "chair_s": round(sum(bool(p["hallucinated"]) for p in per_caption) / n, 4) if n else 0.0,
        "chair_i": round(hall / mentions, 4) if mentions else 0.0,
        "recall": round(hit / n_gt, 4) if n_gt else 0.0,
        "mean_len": round(sum(p["words"] for p in per_caption) / n, 2) if n else 0.0,
    }


def chair_scores(items: Iterable, vocab: Vocabulary = COCO) -> ChairScores:
    """CHAIR over `items`: dicts {"caption", "gt_objects"} or (caption, gt) pairs.

    Fractions in 0..1 (4 decimals); 0.0 where a denominator is 0."""
    per = [score_caption(c, g, vocab) for c, g in map(_item, items)]
    return ChairScores(per, summarize(per))


def coverage() -> dict:
    """How much the COCO vocabulary knows: classes, synonyms written, surface forms matched."""
    return {
        "classes": len(COCO_CLASSES),
        "synonyms": sum(len(v) for v in COCO_SYNONYMS.values()),
        "surface_forms": sum(1 for c in COCO.lookup.values() if c is not None),
        "blocking_phrases": sum(1 for c in COCO.lookup.values() if c is None),
    }
