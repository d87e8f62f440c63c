"""Word lists and random values for the synthetic tasks, split into disjoint TRAIN and EVAL halves.

RULER (Hsieh et al. 2024, arXiv 2404.06654) draws needle keys ("adjective-noun") and the common
words of its cwe task from the ``wonderwords`` lists. We keep our own small lists here (no extra
dependency) and widen the cwe vocabulary with the words of the shipped public-domain book. Every list
is cut in two by a stable hash of the word, so TRAIN and EVAL never share a key or a word.
"""

from __future__ import annotations

import random
import re
import uuid
import zlib
from collections import Counter
from functools import lru_cache

from trainkv.data.haystack import PROSE_FILE, check_split

ADJECTIVES = tuple("""
able absent ageless amber ancient angry arctic ashen autumn awake bald bashful bitter bleak blissful
blunt bold bouncy brave brief bright brisk broad bronze bumpy busy calm candid careful cheerful chilly
civic clever cloudy clumsy coastal cobalt colossal cosmic cozy crimson crisp crooked cubic curly
curved damp dapper daring dazzling deep dense dusty eager early earnest electric elegant empty
endless equal exotic faded faint fancy fearless feeble fierce fiery flaky fluffy foggy fond formal
fragile frail frantic fresh frosty frozen funny furry fuzzy gentle giant gifted gloomy glossy golden
graceful grand grateful greasy great grumpy hairy handsome hardy hasty hazy hearty heavy hidden hollow
homely honest humble hungry wintry idle innocent ivory jagged jolly jovial juicy keen kind lame lanky
large lavish lazy lean lively lofty lonely loud fortunate lunar magenta majestic mellow merry mighty
mild misty modern modest moist molten muddy murky narrow neat nimble noble noisy nutty obedient odd
olive opaque orange ornate pale patient peaceful perky petite plain playful plucky plump polite
portly precious proud purple quaint quick quiet radiant rapid rare rigid ripe robust rocky rosy rough
round royal rugged rustic rusty sacred salty sandy scarlet serene shaggy shallow sharp shiny short
silent silky silver simple sleepy slender slim slippery smoky smooth snowy soft solar solemn sour
spicy spotted stale steady steep sticky stormy stout strict sturdy subtle sudden sunny swift tall
tame tangy tender thick thirsty tidy timid tiny tough tranquil tropical twin vast velvet vivid
wary wealthy weary wicked wide wild windy wise witty wooden woolly zealous
""".split())

NOUNS = tuple("""
acorn actor airport album alley anchor aardvark antelope apple apron arch arrow attic avenue badger bagel
bakery balloon bamboo banana banjo barn basket bat beacon bean bear beaver hornet beetle bell bench
bicycle bison blanket blossom boat bonnet boot bottle boulder bowl bracelet branch bread brick
bridge brook broom bucket buffalo bugle bunny butter button cabin cactus camel camera canal candle
canoe canyon cape carpet carrot castle cat cave cedar cello chair cheetah cherry chestnut chimney
circus cliff clock cloud clover coconut comet compass cookie copper coral cottage cougar crab crane
crayon creek cricket magpie crown cup curtain cushion daisy deer desert diamond dolphin donkey door
dragon drum duck eagle easel elbow elephant elk emerald engine falcon feather fence fern ferry fiddle
fig finch flag flame flute fork fossil fountain fox frog garden garlic gazelle geyser giraffe glacier
glove goat goose gorilla grape guitar hammer harbor harp hawk hedge helmet heron hill hippo honey
horse hut iguana island jacket jaguar jar jelly jungle kayak kettle kite koala ladder lagoon lake
lamp lantern lemon leopard lettuce library lighthouse lily lion lizard llama lobster locket lynx
magnet mango maple marble meadow melon mirror mitten mole monkey moose moth mountain mule mushroom
needle nest nutmeg oak oasis ocean octopus olive onion orchard orchid ostrich otter owl oyster paddle
palace panda panther parrot peach peacock pear pebble pelican pencil penguin pepper piano pickle
pigeon pillow pine planet plum pond poppy potato puffin pumpkin puppet rabbit raccoon radish raft
rainbow raven reef rhino ribbon river robin rocket rooster rose saddle sailboat salmon sandal
scarf seal shark sheep shell ship shovel sparrow spider spoon squid squirrel stable starfish statue
stork stream sunflower swan sweater table teapot temple tiger toad tomato tortoise tower tractor
trumpet tulip tunnel turkey turtle umbrella unicorn valley vase violin volcano wagon walnut walrus
waterfall whale whistle willow window wolf wombat yacht zebra
""".split())

VERBS = tuple("""
admire answer arrange arrive bake balance bounce breathe build calculate carry celebrate chase
climb collect compare cook count crawl dance decorate deliver describe dig discover dive draw dream
drift explore fetch float fold gather giggle glide grow guard hammer harvest hike hover hunt imagine
invent juggle jump knit laugh launch listen march measure melt mend murmur observe paint paddle
plant polish pour practise print pull push question race read relax repair rescue roam row sail
scatter search sew shine shiver signal sing sketch skate skip sleep slide sneeze sort sparkle spin
splash sprint squeeze stack steer stitch stroll study swim swing tickle travel trim tumble twirl
wander wash wave weave whisper whistle wiggle wonder wrap yawn
""".split())


def in_split(word: str, split: str) -> bool:
    """Stable assignment of a word to TRAIN (even CRC-32) or EVAL (odd CRC-32)."""
    return (zlib.crc32(word.encode("utf-8")) & 1) == (0 if check_split(split) == "train" else 1)


@lru_cache(maxsize=8)
def adjectives(split: str) -> tuple[str, ...]:
    return tuple(w for w in ADJECTIVES if in_split(w, split))


@lru_cache(maxsize=8)
def nouns(split: str) -> tuple[str, ...]:
    return tuple(w for w in NOUNS if in_split(w, split))


@lru_cache(maxsize=1)
def _book_words() -> tuple[str, ...]:
    """Lower-case words (4-12 letters) of the shipped book, minus its 150 most frequent ones."""
    text = PROSE_FILE.read_text(encoding="utf-8").lower()
    counts = Counter(re.findall(r"(?<![a-z'])[a-z]{4,12}(?![a-z'])", text))
    frequent = {w for w, _ in counts.most_common(150)}
    return tuple(sorted(w for w in counts if w not in frequent))


@lru_cache(maxsize=8)
def english_words(split: str) -> tuple[str, ...]:
    """The split's word list for the common-words task (sorted).

    Words contained in another word of the list are dropped ("arch" / "search"), so that the
    substring metric cannot credit one word for another.
    """
    pool = set(ADJECTIVES) | set(NOUNS) | set(VERBS) | set(_book_words())
    words = sorted(w for w in pool if in_split(w, split))
    return tuple(w for w in words if not any(w != o and w in o for o in words))


def random_word_key(rng: random.Random, split: str) -> str:
    """An ``adjective-noun`` key, as RULER's word keys (e.g. ``"tender-falcon"``)."""
    return f"{rng.choice(adjectives(split))}-{rng.choice(nouns(split))}"


def random_number(rng: random.Random, digits: int = 7) -> str:
    """A random number with exactly ``digits`` digits (RULER's values are 7-digit numbers)."""
    return str(rng.randint(10 ** (digits - 1), 10**digits - 1))


def random_uuid(rng: random.Random) -> str:
    """A version-4 UUID drawn from ``rng`` (never from the global RNG)."""
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def random_value(rng: random.Random, kind: str, split: str) -> str:
    """A needle key or value of ``kind`` ``"numbers"``, ``"words"`` or ``"uuids"``."""
    if kind == "numbers":
        return random_number(rng)
    if kind == "words":
        return random_word_key(rng, split)
    if kind == "uuids":
        return random_uuid(rng)
    raise ValueError(f"unknown value kind {kind!r}")


def distinct_values(rng: random.Random, kind: str, split: str, n: int, exclude: set[str] = frozenset()) -> list[str]:
    """``n`` distinct values of ``kind``, none in ``exclude``."""
    out: list[str] = []
    seen = set(exclude)
    tries = 0
    while len(out) < n:
        v = random_value(rng, kind, split)
        tries += 1
        if v not in seen:
            seen.add(v)
            out.append(v)
        elif tries > 100 * (n + 10):
            raise ValueError(f"cannot draw {n} distinct {kind} for split {split!r}")
    return out
