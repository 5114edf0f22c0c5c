"""The built-in offline review corpus (README "The paper's configurations"): movie reviews composed from templates and
slot vocabularies, deterministic from a seed, so PPO prompts, the activation cache and the triples need no download.

Every word is written here (nothing is copied from an existing corpus). Texts are lower case with only `.` and
`,` as punctuation, so a word-level tokenizer built from `vocabulary()` plus `PUNCTUATION` covers them exactly.
The evaluative slots are rich in VADER lexicon words of both signs; the neutral slots mostly hold words the
lexicon lacks, so lexicon tokens occur in thousands of different contexts.
"""

from __future__ import annotations

import hashlib
import random
from functools import lru_cache
from typing import NamedTuple

PUNCTUATION = (".", ",")

FILMS = [
    "film", "movie", "picture", "feature", "sequel", "remake", "documentary", "thriller", "western", "musical",
    "drama", "whodunit", "adaptation", "biopic", "cartoon", "epic", "melodrama", "satire", "detective story",
    "space opera", "period piece", "road movie", "costume drama", "heist story", "family film", "debut",
]
ASPECTS = [
    "plot", "script", "story", "dialogue", "pacing", "ending", "opening", "soundtrack", "score", "cinematography",
    "editing", "camera work", "lighting", "costumes", "set design", "casting", "direction", "screenplay",
    "visuals", "music", "atmosphere", "tone", "writing", "climax", "subplot", "premise", "photography",
    "production design", "makeup", "choreography", "narration", "final act", "first half", "second half",
    "middle section", "sound design", "visual effects", "action scenes", "character work", "structure",
    "framing", "colour palette", "running time", "opening scene", "last scene", "chase sequence",
]
ROLES = [
    "lead", "lead actor", "lead actress", "director", "henchman", "minor cast", "cast", "composer", "writer",
    "narrator", "newcomer", "veteran actor", "ensemble", "young actor", "screenwriter", "editor", "sidekick",
    "main actor", "title character", "second lead", "older actor", "producer", "cinematographer",
]
CHARACTERS = [
    "detective", "teacher", "farmer", "sailor", "pilot", "lawyer", "nurse", "painter", "mechanic", "student",
    "journalist", "chef", "soldier", "clerk", "miner", "engineer", "musician", "photographer", "fisherman",
    "librarian", "inventor", "shopkeeper", "astronaut", "carpenter", "grandmother", "brother", "sister",
    "neighbour", "mayor", "professor", "driver", "courier", "scientist", "stranger", "twin",
]
PLACES = [
    "a small town", "the city", "a village", "an island", "the mountains", "the desert", "a harbour", "a farm",
    "a factory", "a hotel", "a school", "a hospital", "a ship", "a train", "the suburbs", "a lighthouse",
    "an office", "a castle", "a forest", "a kitchen", "a museum", "a garage", "a submarine", "a space station",
    "the north", "the coast", "a valley", "an apartment", "a bakery", "a circus",
]
MOVES = [
    "travels to", "moves to", "returns to", "works in", "lives in", "arrives in", "grows up in", "settles in",
    "searches", "visits", "runs", "inherits", "leaves",
]
WHEN = [
    "last night", "on a train", "at home", "on a wet afternoon", "over the weekend", "at the cinema",
    "on television", "on a plane", "after work", "on a sunday", "with my brother", "with my parents",
    "late at night", "twice", "on a small screen", "in a half full theatre", "on a laptop", "last week",
]
SOURCES = [
    "a book", "a stage show", "a short story", "a comic book", "an older film", "a radio drama", "a memoir",
    "a magazine article", "a television series", "a poem", "a folk tale",
]
NUMBERS = ["two", "three", "four", "five", "six", "ninety", "eighty", "seventy", "a hundred"]
AUDIENCES = [
    "anyone", "families", "students", "older viewers", "fans of the genre", "everyone", "teenagers",
    "film buffs", "regular viewers", "my parents", "children", "adults",
]
ADVERBS = [
    "very", "really", "quite", "rather", "extremely", "genuinely", "somewhat", "fairly", "mostly",
    "incredibly", "absolutely", "completely", "utterly", "deeply", "oddly", "consistently",
    "occasionally", "often", "always", "almost", "simply", "so", "too", "remarkably",
]
OPENERS = [
    "in my view", "for me", "overall", "all in all", "in the end", "by the end", "to my mind", "on the whole",
    "frankly", "in short", "as a whole", "above all", "at first", "from the start", "looking back",
]
CONNECTIVES = ["but", "however", "still", "even so", "at the same time", "then again", "yet", "meanwhile"]

# Polarity-dependent slots: +1 positive, -1 negative, 0 neutral (mostly absent from the VADER lexicon).
ADJECTIVES = {
    +1: [
        "great", "brilliant", "wonderful", "excellent", "superb", "outstanding", "fantastic", "terrific",
        "beautiful", "gorgeous", "stunning", "charming", "delightful", "lovely", "clever", "smart", "funny",
        "hilarious", "thrilling", "exciting", "entertaining", "enjoyable", "fascinating", "impressive",
        "remarkable", "magnificent", "splendid", "marvelous", "fabulous", "perfect", "flawless", "elegant",
        "graceful", "vibrant", "lively", "inspiring", "inspired", "heartwarming", "joyful", "joyous", "sweet",
        "tender", "warm", "rich", "bold", "creative", "innovative", "intelligent", "thoughtful", "sincere",
        "honest", "heartfelt", "powerful", "strong", "effective", "convincing", "confident", "playful",
        "cheerful", "pleasant", "satisfying", "rewarding", "amazing", "awesome", "breathtaking", "superior",
        "ideal", "nice", "good", "glorious", "radiant", "brave", "daring", "ambitious", "adorable", "cute",
        "classy", "gentle", "romantic", "sophisticated", "dynamic", "energetic", "engaging", "compelling",
        "moving", "touching", "gripping", "memorable", "fresh", "polished", "witty", "solid", "interesting",
        "humorous", "amusing", "captivating", "enchanting", "uplifting", "stimulating", "fun", "sunny",
        "wise", "admirable", "masterful", "precious", "generous", "dazzling", "refreshing",
        "excellently made", "beautifully shot", "wonderfully acted", "perfectly paced",
    ],
    -1: [
        "bad", "awful", "terrible", "horrible", "dreadful", "dull", "boring", "tedious", "stupid", "ridiculous",
        "pathetic", "lame", "weak", "poor", "messy", "clumsy", "sloppy", "bland", "lifeless", "hollow",
        "painful", "miserable", "annoying", "irritating", "frustrating", "disappointing", "ugly", "nasty",
        "mediocre", "pointless", "useless", "worthless", "meaningless", "tiresome", "confusing", "incoherent",
        "ludicrous", "absurd", "cheap", "shallow", "stale", "predictable", "forgettable", "unpleasant",
        "unconvincing", "dreary", "gloomy", "grim", "depressing", "sad", "offensive", "obnoxious", "insulting",
        "embarrassing", "shameful", "disgusting", "horrendous", "atrocious", "lousy", "rotten", "vile",
        "wretched", "bleak", "dismal", "sluggish", "lazy", "incompetent", "inadequate", "uninspired",
        "hopeless", "flawed", "broken", "wrong", "worse", "worst", "awkward", "sick", "tired", "sour",
        "pretentious", "crude", "empty", "harsh", "careless", "clueless", "dumb", "unbearable",
        "tragic", "hideous", "wasteful", "dishonest", "unfunny", "joyless", "tasteless", "insipid",
        "terribly made", "badly shot", "poorly acted", "horribly paced",
    ],
    0: [
        "long", "short", "quiet", "slow", "fast", "old", "new", "recent", "modern", "wide", "small", "large",
        "early", "late", "foreign", "local", "independent", "animated", "silent", "familiar", "simple", "complex",
        "young", "historical", "rural", "urban", "northern", "coastal", "orchestral", "minimal", "busy",
        "colourful", "digital", "handmade", "literal", "formal", "plain", "brief", "lengthy", "layered",
        "conventional", "experimental", "theatrical", "talky", "static", "episodic", "linear", "nonlinear",
    ],
}
VERBS = {
    +1: [
        "loved", "enjoyed", "admired", "adored", "liked", "appreciated", "cherished", "praised", "treasured",
        "savoured", "relished", "was impressed by", "was delighted by", "was thrilled by", "was charmed by",
        "was moved by", "was amazed by", "was fascinated by", "was captivated by", "was inspired by",
        "fell in love with", "smiled through", "laughed through",
    ],
    -1: [
        "hated", "disliked", "despised", "loathed", "resented", "regretted", "was bored by", "was annoyed by",
        "was disappointed by", "was frustrated by", "was irritated by", "was confused by", "was offended by",
        "was disgusted by", "was angered by", "was tired of", "suffered through", "struggled through",
        "was embarrassed by", "was upset by",
    ],
}
NOUNS = {
    +1: [
        "masterpiece", "triumph", "delight", "joy", "treasure", "pleasure", "success", "winner", "marvel",
        "miracle", "thrill", "treat", "blessing", "gift", "gem", "achievement", "wonder", "beauty", "victory",
        "celebration", "sensation", "classic",
    ],
    -1: [
        "disaster", "mess", "failure", "disappointment", "waste", "catastrophe", "nightmare", "embarrassment",
        "insult", "travesty", "tragedy", "fiasco", "letdown", "flop", "chore", "headache", "bore",
        "shambles", "mistake", "trainwreck", "ordeal",
    ],
}
FEELINGS = {
    +1: [
        "happy", "glad", "delighted", "thrilled", "satisfied", "amused", "inspired", "excited", "grateful",
        "pleased", "cheerful", "hopeful", "uplifted", "refreshed", "proud", "relaxed", "moved", "content",
    ],
    -1: [
        "sad", "bored", "angry", "annoyed", "disappointed", "frustrated", "confused", "tired", "miserable",
        "irritated", "upset", "depressed", "cheated", "ashamed", "exhausted", "sick", "restless", "empty",
    ],
}
POLAR_SLOTS = {"adj": ADJECTIVES, "verb": VERBS, "noun": NOUNS, "feel": FEELINGS}
PLAIN_SLOTS = {
    "film": FILMS, "aspect": ASPECTS, "role": ROLES, "character": CHARACTERS, "place": PLACES, "move": MOVES,
    "when": WHEN, "source": SOURCES, "number": NUMBERS, "audience": AUDIENCES, "adv": ADVERBS,
    "opener": OPENERS,
}

# Templates with an evaluative slot take the sentence's polarity (+1 or -1); NEUTRAL ones also fill `adj` from the
# neutral list. Slot names in braces; everything else is literal.
EVALUATIVE = [
    "the {aspect} is {adv} {adj}",
    "the {aspect} was {adj} and the {aspect} was {adv} {adj}",
    "i {verb} the {aspect}",
    "i {verb} the {aspect} of this {film}",
    "i {verb} this {film} more than i expected",
    "the {role} gives a {adj} performance",
    "the {role} is {adj} as the {character}",
    "this is a {adv} {adj} {film}",
    "what a {noun} this {film} is",
    "the {aspect} felt {adv} {adj} to me",
    "{opener} the {film} is {adj}",
    "{opener} it is a {noun}",
    "the {aspect} makes the whole {film} {adj}",
    "it was {adv} {adj} from start to finish",
    "the {role} and the {role} are both {adj}",
    "i felt {feel} when it ended",
    "i left the cinema feeling {adv} {feel}",
    "the {film} is a {adj} {noun}",
    "every scene with the {role} is {adj}",
    "the {role} {verb} the {aspect} too, and it shows",
    "the {aspect} and the {aspect} are {adv} {adj}",
    "the {adj} {aspect} left me {feel}",
    "watching it {when} was a {noun}",
]
POSITIVE_ONLY = [
    "i would {adv} recommend it to {audience}",
    "it deserves every award it gets",
    "i will watch it again soon",
]
NEGATIVE_ONLY = [
    "avoid this {film} unless you enjoy wasting time",
    "i want those two hours of my life back",
    "i almost walked out halfway through",
]
NEUTRAL = [
    "the story follows a {character} who {move} {place}",
    "it runs about {number} minutes",
    "the {film} was shot in {place}",
    "i watched it {when}",
    "the {role} is cast as a {character}",
    "most of the {film} takes place in {place}",
    "the {aspect} is {adv} {adj}",
    "it is based on {source}",
    "the {film} is {adj} and {adj}",
    "the {role} also appears in {source}",
    "the {aspect} is mostly {adj}",
    "there are {number} main characters",
    "i saw this {film} {when}",
    "it is a {adj} {film} about a {character}",
    "the {role} used to be a {character}",
]

LABELS = ("positive", "negative", "mixed", "neutral")
_LABEL_WEIGHTS = (0.35, 0.35, 0.2, 0.1)
MIN_SENTENCES, MAX_SENTENCES = 2, 8


class Review(NamedTuple):
    text: str
    label: str  # one of LABELS


def _parse(template: str) -> tuple[tuple[bool, str], ...]:
    """A template as (is_slot, name-or-word) pairs, parsed once so generation is a loop over choices."""
    return tuple((part.startswith("{"), part.strip("{}")) for part in template.replace(",", " ,").split())


_EVALUATIVE = [_parse(t) for t in EVALUATIVE]
_ONLY = {+1: [_parse(t) for t in POSITIVE_ONLY], -1: [_parse(t) for t in NEGATIVE_ONLY]}
_NEUTRAL = [_parse(t) for t in NEUTRAL]


def _sentence(rng: random.Random, polarity: int) -> str:
    if polarity == 0:
        template = rng.choice(_NEUTRAL)
    elif rng.random() < 0.1:
        template = rng.choice(_ONLY[polarity])
    else:
        template = rng.choice(_EVALUATIVE)
    words = []
    for is_slot, name in template:
        if not is_slot:
            words.append(name)
        elif name in POLAR_SLOTS:
            words.append(rng.choice(POLAR_SLOTS[name][polarity]))
        else:
            words.append(rng.choice(PLAIN_SLOTS[name]))
    return " ".join(words).replace(" ,", ",")


def _polarities(rng: random.Random, label: str, n: int) -> list[int]:
    """Sentence polarities for one review: mostly the label's sign with neutral asides; mixed reviews hold both."""
    if label == "neutral":
        return [0] * n
    if label == "mixed":
        signs = [rng.choice((+1, -1, 0)) for _ in range(n)]
        signs[0], signs[-1] = (+1, -1) if rng.random() < 0.5 else (-1, +1)
        return signs
    sign = +1 if label == "positive" else -1
    signs = [sign if rng.random() < 0.7 else 0 for _ in range(n)]
    signs[rng.randrange(n)] = sign
    return signs


def _review(rng: random.Random) -> Review:
    label = rng.choices(LABELS, _LABEL_WEIGHTS)[0]
    signs = _polarities(rng, label, rng.randint(MIN_SENTENCES, MAX_SENTENCES))
    sentences = []
    for i, sign in enumerate(signs):
        sentence = _sentence(rng, sign)
        # A turn from praise to criticism (or back) reads as one with a connective.
        if i and sign and signs[i - 1] == -sign and rng.random() < 0.7:
            sentence = f"{rng.choice(CONNECTIVES)}, {sentence}"
        sentences.append(sentence + ".")
    return Review(" ".join(sentences), label)


def _split_of(text: str) -> str:
    """Which split a text belongs to, from a hash of the text itself: train and test can never share a text."""
    return "train" if hashlib.blake2b(text.encode(), digest_size=1).digest()[0] < 128 else "test"


def generate_labelled_reviews(n: int, seed: int = 0, split: str = "train") -> list[Review]:
    """`n` distinct reviews of `split` ("train" or "test"), the same for the same (n, seed, split); a larger `n`
    extends a smaller one. Each split has its own random stream and owns a disjoint part of the text space."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', not {split!r}")
    rng = random.Random(f"irm-generated-reviews:{split}:{seed}")
    seen: set[str] = set()
    reviews: list[Review] = []
    while len(reviews) < n:
        review = _review(rng)
        if review.text not in seen and _split_of(review.text) == split:
            seen.add(review.text)
            reviews.append(review)
    return reviews


def generate_reviews(n: int, seed: int = 0, split: str = "train") -> list[str]:
    """The texts of `generate_labelled_reviews(n, seed, split)`."""
    return [review.text for review in generate_labelled_reviews(n, seed, split)]


@lru_cache(maxsize=1)
def _vocabulary() -> tuple[str, ...]:
    words: set[str] = set()
    for template in EVALUATIVE + POSITIVE_ONLY + NEGATIVE_ONLY + NEUTRAL:
        words.update(name for is_slot, name in _parse(template) if not is_slot and name not in PUNCTUATION)
    for slot in PLAIN_SLOTS.values():
        words.update(w for entry in slot for w in entry.split())
    for by_sign in POLAR_SLOTS.values():
        words.update(w for entries in by_sign.values() for entry in entries for w in entry.split())
    words.update(w for entry in CONNECTIVES for w in entry.split())
    return tuple(sorted(words))


def vocabulary() -> list[str]:
    """Every word (lower case, no punctuation) the generator can emit, sorted."""
    return list(_vocabulary())
