"""Chat Hard: instruction constraint followed vs. subtly violated."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

from pipeline.synthetic.spec import _cap

# --------------------------------------------------------------------------------------------
# Chat Hard: instruction constraint followed vs. subtly violated
# --------------------------------------------------------------------------------------------


_DESCRIBE3 = (
    ("the ocean", "vast", "deep", "blue"), ("a desert", "hot", "dry", "sandy"),
    ("winter", "cold", "dark", "quiet"), ("a library", "quiet", "calm", "orderly"),
    ("a city at night", "bright", "busy", "loud"), ("a forest", "green", "shady", "peaceful"),
    ("a kitten", "small", "soft", "playful"), ("summer", "warm", "sunny", "long"),
    ("a mountain", "tall", "rocky", "steep"), ("coffee", "hot", "bitter", "energizing"),
)  # fmt: skip

_DEFINITIONS = (
    ("a violin", "a violin is a string instrument played with a bow."),
    ("a glacier", "a glacier is a slow river of ice."),
    ("a comet", "a comet is an icy body that orbits the sun."),
    ("a volcano", "a volcano is an opening where molten rock escapes."),
    ("a spreadsheet", "a spreadsheet is a grid for organizing numbers."),
    ("a lighthouse", "a lighthouse is a tower that guides ships with light."),
    ("a compass", "a compass is a tool whose needle points north."),
    ("a thermometer", "a thermometer is a device that measures temperature."),
)
_EXTRA_SENTENCES = ("It is quite interesting.", "Many people find it useful.", "There is a lot more to say.",
                    "I hope this helps.")

_NUMBER_QA = (
    ("How many legs does a spider have?", "8", "A spider has 8 legs."),
    ("How many days are in a week?", "7", "There are 7 days in a week."),
    ("How many sides does a triangle have?", "3", "A triangle has 3 sides."),
    ("How many months are in a year?", "12", "A year has 12 months."),
    ("How many hours are in a day?", "24", "There are 24 hours in a day."),
    ("How many players are on a soccer team on the field?", "11", "Each team has 11 players."),
)

_DESCRIBE3_HELDOUT = (
    ("a volcano", "hot", "loud", "dangerous"), ("the night sky", "dark", "vast", "starry"),
    ("a garden", "green", "fresh", "quiet"), ("an old castle", "old", "grand", "cold"),
    ("a rainforest", "wet", "dense", "alive"), ("a bakery", "warm", "sweet", "busy"),
)  # fmt: skip

_TIPS_HELDOUT = (
    ("learning to swim", "Practice floating on your back before you try to kick."),
    ("painting a room", "Tape the edges and paint the trim before the walls."),
    ("planting tomatoes", "Plant them deep so the stems grow extra roots."),
    ("learning to type", "Keep your fingers on the home row and watch the screen."),
    ("packing for a trip", "Roll your clothes instead of folding them to save space."),
)

_TIPS = (
    ("studying for exams", "Study in short sessions and test yourself often."),
    ("saving money", "Set aside a fixed amount every payday."),
    ("learning guitar", "Practice chord changes slowly for ten minutes a day."),
    ("cooking rice", "Rinse the rice first so it does not get sticky."),
    ("public speaking", "Rehearse out loud and pause between key points."),
    ("keeping houseplants alive", "Check the soil with your finger before you water."),
    ("training for a first marathon", "Build your weekly distance slowly."),
    ("writing an essay", "Outline your main points before you start."),
)
_CLOSING_Q = (
    "Would you like more tips?",
    "Does that help?",
    "What will you try first?",
    "Want a second tip?",
)
_CLOSING_S = ("Good luck!", "I hope that helps.", "You can do it.", "Have fun with it.")

_CATEGORY_ITEMS = (
    ("fruits", ("apple", "banana", "cherry", "mango", "pear", "grape", "plum")),
    ("colors", ("red", "blue", "green", "yellow", "purple", "orange")),
    ("planets", ("Mercury", "Venus", "Earth", "Mars", "Jupiter", "Saturn")),
    ("musical instruments", ("piano", "violin", "flute", "drum", "guitar", "trumpet")),
    ("farm animals", ("cow", "pig", "sheep", "goat", "horse", "chicken")),
    ("programming languages", ("Python", "Java", "Rust", "Go", "Ruby", "Haskell")),
    ("European countries", ("France", "Spain", "Italy", "Poland", "Sweden", "Greece")),
)

_COLOR_OF = (
    ("a ripe banana", "yellow"), ("the clear daytime sky", "blue"), ("fresh grass", "green"),
    ("fresh snow", "white"), ("coal", "black"), ("a ripe tomato", "red"), ("a carrot", "orange"),
    ("a lemon", "yellow"),
)  # fmt: skip

_YES_NO = (
    ("the sun", "a star", True), ("a whale", "a fish", False), ("a tomato", "a fruit", True),
    ("a bat", "a bird", False), ("gold", "a metal", True), ("the moon", "a planet", False),
    ("a spider", "an insect", False), ("Paris", "in France", True), ("ice", "frozen water", True),
)  # fmt: skip

_SHORT_QA = (
    ("Which planet is closest to the sun?", "the closest planet to the sun is Mercury."),
    ("What do bees make?", "bees make honey from flower nectar."),
    ("How many continents are there?", "there are seven continents."),
    ("What gas do plants absorb?", "plants absorb carbon dioxide from the air."),
    ("What is the largest ocean?", "the largest ocean is the Pacific."),
    ("How many strings does a standard guitar have?", "a standard guitar has six strings."),
    ("What is the freezing point of water in Celsius?", "water freezes at zero degrees Celsius."),
)
_START_WORDS = ("Certainly", "Well", "Sure", "Indeed", "Absolutely")

_FIVE_WORDS = (
    (
        "the water cycle",
        "Water evaporates, condenses, then falls.",
        "Water evaporates, condenses, and then falls.",
    ),
    ("photosynthesis", "Plants turn sunlight into food.", "Plants turn sunlight into their food."),
    ("a healthy breakfast", "Protein, fruit, and whole grains.", "Protein, fresh fruit, and whole grains."),
    ("the moon landing", "Astronauts walked on the moon.", "Astronauts first walked on the moon."),
    ("regular exercise", "Moving daily keeps you healthy.", "Moving every day keeps you healthy."),
    ("recycling", "Reusing materials reduces new waste.", "Reusing old materials reduces new waste."),
)

_AVOID_WORD = (
    ("the sun", "hot", "The sun is a bright star that warms the Earth.",
     "The sun is a hot, bright star that warms the Earth."),
    ("ice cream", "cold", "Ice cream is a sweet frozen dessert made from cream.",
     "Ice cream is a sweet, cold dessert made from cream."),
    ("a cat", "pet", "A cat is a small furry animal that purrs.", "A cat is a small furry pet that purrs."),
    ("the ocean", "water", "The ocean is a huge salty body that covers most of the Earth.",
     "The ocean is a huge body of salty water covering most of the Earth."),
    ("a bicycle", "wheels", "A bicycle is a pedal-powered vehicle for one rider.",
     "A bicycle is a pedal-powered vehicle with two wheels."),
    ("a piano", "keys", "A piano is a large instrument played by pressing black and white levers.",
     "A piano is a large instrument with black and white keys."),
)  # fmt: skip


def _three_words(items: tuple[tuple[str, ...], ...], prompt: str, rng: random.Random) -> tuple[str, str, str]:
    thing, *ws = rng.choice(items)
    chosen = f"{_cap(ws[0])}, {ws[1]}, {ws[2]}."
    if rng.random() < 0.5:
        rejected = f"{_cap(ws[0])}, {ws[1]}, and {ws[2]}."
    else:
        rejected = f"Very {ws[0]}, {ws[1]}, {ws[2]}."
    return prompt.format(thing=thing), chosen, rejected


def _ch_one_sentence(rng: random.Random) -> tuple[str, str, str]:
    thing, text = rng.choice(_DEFINITIONS)
    chosen = _cap(text)
    return f"In one sentence, tell me what {thing} is.", chosen, f"{chosen} {rng.choice(_EXTRA_SENTENCES)}"


def _end_question(tips: tuple[tuple[str, str], ...], prompt: str, rng: random.Random) -> tuple[str, str, str]:
    activity, tip = rng.choice(tips)
    rejected = tip if rng.random() < 0.3 else f"{tip} {rng.choice(_CLOSING_S)}"
    return prompt.format(activity=activity), f"{tip} {rng.choice(_CLOSING_Q)}", rejected


def _ch_list_three(rng: random.Random) -> tuple[str, str, str]:
    cat, pool = rng.choice(_CATEGORY_ITEMS)
    picks = rng.sample(pool, 4)
    wrong = picks if rng.random() < 0.5 else picks[:2]
    return f"List three {cat}, separated by commas.", ", ".join(picks[:3]), ", ".join(wrong)


def _ch_one_word(rng: random.Random) -> tuple[str, str, str]:
    thing, color = rng.choice(_COLOR_OF)
    rejected = rng.choice((f"It is {color}.", f"{_cap(color)}, usually.", f"Mostly {color}."))
    return f"Answer with a single word: what color is {thing}?", f"{_cap(color)}.", rejected


def _ch_yes_no(rng: random.Random) -> tuple[str, str, str]:
    x, y, truth = rng.choice(_YES_NO)
    yn = "Yes" if truth else "No"
    full = f"{yn}, {x} is {y}." if truth else f"No, {x} is not {y}."
    rejected = rng.choice((full, f"{yn}, it is." if truth else "No, it is not.", f"{yn}, definitely."))
    return f"Answer only yes or no: is {x} {y}?", f"{yn}.", rejected


def _ch_start_word(rng: random.Random) -> tuple[str, str, str]:
    q, a = rng.choice(_SHORT_QA)
    w = rng.choice(_START_WORDS)
    if rng.random() < 0.5:
        rejected = _cap(a)
    else:
        rejected = f"{rng.choice([o for o in _START_WORDS if o != w])}, {a}"
    return f"Begin your reply with the word '{w}'. {q}", f"{w}, {a}", rejected


def _ch_number_only(rng: random.Random) -> tuple[str, str, str]:
    q, number, sentence = rng.choice(_NUMBER_QA)
    rejected = sentence if rng.random() < 0.5 else f"{number}, of course."
    return f"Reply with only a number: {q}", number, rejected


def _ch_five_words(rng: random.Random) -> tuple[str, str, str]:
    topic, chosen, rejected = rng.choice(_FIVE_WORDS)
    return f"Summarize {topic} in exactly five words.", chosen, rejected


def _ch_name_two(rng: random.Random) -> tuple[str, str, str]:
    cat, pool = rng.choice(_CATEGORY_ITEMS)
    a, b, c = rng.sample(pool, 3)
    return f"Name exactly two {cat} and nothing else.", f"{_cap(a)} and {b}.", f"{_cap(a)}, {b} and {c}."


def _ch_avoid_word(rng: random.Random) -> tuple[str, str, str]:
    thing, word, chosen, rejected = rng.choice(_AVOID_WORD)
    return f"Describe {thing} without using the word '{word}'.", chosen, rejected


@dataclass(frozen=True)
class _ChatHard:
    tid: str
    group: str
    make: Callable[[random.Random], tuple[str, str, str]]


_CHAT_HARD: tuple[_ChatHard, ...] = (
    _ChatHard("chat_hard/three-words", "heldin",
              partial(_three_words, _DESCRIBE3, "Describe {thing} in exactly three words.")),
    _ChatHard("chat_hard/one-sentence", "heldin", _ch_one_sentence),
    _ChatHard("chat_hard/end-with-question", "heldin",
              partial(_end_question, _TIPS, "Give me one tip for {activity}, and end your reply with a question.")),
    _ChatHard("chat_hard/list-three", "heldin", _ch_list_three),
    _ChatHard("chat_hard/one-word", "heldin", _ch_one_word),
    _ChatHard("chat_hard/yes-no-only", "heldin", _ch_yes_no),
    _ChatHard("chat_hard/start-with-word", "heldout", _ch_start_word),
    _ChatHard("chat_hard/number-only", "heldout", _ch_number_only),
    _ChatHard("chat_hard/five-words", "heldout", _ch_five_words),
    _ChatHard("chat_hard/name-two", "heldout", _ch_name_two),
    _ChatHard("chat_hard/avoid-word", "heldout", _ch_avoid_word),
    # held-out wordings and items of two held-in constraint kinds: does the learnt rule transfer?
    _ChatHard("chat_hard/three-words-reworded", "heldout",
              partial(_three_words, _DESCRIBE3_HELDOUT, "Give me three words, no more and no fewer, for {thing}.")),
    _ChatHard("chat_hard/end-question-reworded", "heldout",
              partial(_end_question, _TIPS_HELDOUT, "Offer one piece of advice about {activity} and close with a "
                      "question.")),
)


