"""Chat: on-topic answer vs. off-topic / truncated answer."""

from __future__ import annotations

import random
from dataclasses import dataclass

from pipeline.synthetic.spec import _cap

# --------------------------------------------------------------------------------------------
# Chat: on-topic answer vs. off-topic / truncated answer
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Chat:
    tid: str
    group: str
    question: str
    answers: tuple[str, ...]  # answer phrasings, formatted with the item's fields
    items: tuple[dict[str, str], ...]

    def qa(self, rng: random.Random) -> tuple[str, str]:
        item = rng.choice(self.items)
        return self.question.format(**item), _cap(rng.choice(self.answers).format(**item))


def _items(keys: str, *rows: tuple[str, ...]) -> tuple[dict[str, str], ...]:
    names = keys.split()
    return tuple(dict(zip(names, row, strict=True)) for row in rows)


_CHAT: tuple[_Chat, ...] = (
    # ---- held-in
    _Chat(
        "chat/howto", "heldin", "How do I {task}?", ("{ans}", "Here is a simple way. {ans}"),
        _items(
            "task ans",
            ("boil an egg", "Put the egg in boiling water for about nine minutes, then cool it in cold water."),
            ("water a cactus", "Water it deeply only when the soil is completely dry, about every two weeks."),
            ("clean a cast iron pan", "Rinse it with hot water, scrub off food, dry it fully, and rub in a little oil."),
            ("fall asleep faster", "Keep a regular bedtime, avoid screens before bed, and keep your room cool and dark."),
            ("remember new words", "Review them with spaced repetition and use each word in a sentence of your own."),
            ("start running", "Begin with short run-walk intervals three times a week and add distance slowly."),
            ("remove a coffee stain", "Blot it, rinse with cold water, then rub in a little dish soap before washing."),
            ("make cold brew coffee", "Steep coarse coffee grounds in cold water for about twelve hours, then strain."),
            ("keep bread fresh longer", "Store it in a bread box or freeze slices you will not eat within two days."),
            ("tie a tie", "Cross the wide end over, loop it up through the neck, pull it down through the knot, and tighten."),
        ),
    ),
    _Chat(
        "chat/capital", "heldin", "What is the capital of {country}?",
        ("The capital of {country} is {city}.", "{city} is the capital of {country}."),
        _items(
            "country city",
            ("France", "Paris"), ("Japan", "Tokyo"), ("Canada", "Ottawa"), ("Australia", "Canberra"),
            ("Italy", "Rome"), ("Egypt", "Cairo"), ("Kenya", "Nairobi"), ("Peru", "Lima"),
            ("Norway", "Oslo"), ("Turkey", "Ankara"), ("Spain", "Madrid"), ("Thailand", "Bangkok"),
        ),
    ),
    _Chat(
        "chat/define", "heldin", "What does the word '{word}' mean?",
        ("'{word}' means {d}.", "The word '{word}' means {d}."),
        _items(
            "word d",
            ("generous", "willing to give more than is expected"), ("fragile", "easily broken or damaged"),
            ("ancient", "very old, from a long time ago"), ("brief", "lasting only a short time"),
            ("curious", "eager to learn or know something"), ("rapid", "happening very quickly"),
            ("humble", "not proud, modest about yourself"), ("vivid", "very bright, clear, or detailed"),
            ("reluctant", "unwilling and hesitant to do something"), ("fertile", "able to produce a lot of growth"),
        ),
    ),
    _Chat(
        "chat/opposite", "heldin", "What is the opposite of '{w}'?",
        ("The opposite of '{w}' is '{o}'.", "'{o}' is the opposite of '{w}'."),
        _items(
            "w o",
            ("hot", "cold"), ("early", "late"), ("empty", "full"), ("ancient", "modern"), ("brave", "cowardly"),
            ("wide", "narrow"), ("rough", "smooth"), ("heavy", "light"), ("loud", "quiet"), ("victory", "defeat"),
        ),
    ),
    _Chat(
        "chat/units", "heldin", "How many {small} are there in {big}?",
        ("There are {n} {small} in {big}.", "{big} has {n} {small}."),
        _items(
            "small big n",
            ("minutes", "an hour", "60"), ("days", "a week", "7"), ("months", "a year", "12"),
            ("centimeters", "a meter", "100"), ("grams", "a kilogram", "1000"), ("hours", "a day", "24"),
            ("meters", "a kilometer", "1000"), ("years", "a century", "100"), ("inches", "a foot", "12"),
            ("ounces", "a pound", "16"),
        ),
    ),
    # ---- held-out
    _Chat(
        "chat/author", "heldout", "Who wrote {book}?",
        ("{book} was written by {author}.", "{author} wrote {book}."),
        _items(
            "book author",
            ("Hamlet", "William Shakespeare"), ("Pride and Prejudice", "Jane Austen"), ("1984", "George Orwell"),
            ("Don Quixote", "Miguel de Cervantes"), ("War and Peace", "Leo Tolstoy"), ("Frankenstein", "Mary Shelley"),
            ("Moby-Dick", "Herman Melville"), ("The Odyssey", "Homer"), ("Jane Eyre", "Charlotte Bronte"),
        ),
    ),
    _Chat(
        "chat/color-mix", "heldout", "What color do you get when you mix {a} and {b}?",
        ("Mixing {a} and {b} gives you {c}.", "You get {c} when you mix {a} and {b}."),
        _items(
            "a b c",
            ("blue", "yellow", "green"), ("red", "yellow", "orange"), ("red", "blue", "purple"),
            ("red", "white", "pink"), ("black", "white", "gray"), ("blue", "orange", "brown"),
        ),
    ),
    _Chat(
        "chat/language", "heldout", "What language do most people speak in {country}?",
        ("Most people in {country} speak {lang}.", "The main language of {country} is {lang}."),
        _items(
            "country lang",
            ("Brazil", "Portuguese"), ("Mexico", "Spanish"), ("Germany", "German"), ("Greece", "Greek"),
            ("Poland", "Polish"), ("Sweden", "Swedish"), ("Vietnam", "Vietnamese"), ("Hungary", "Hungarian"),
        ),
    ),
    _Chat(
        "chat/chem-symbol", "heldout", "What is the chemical symbol for {el}?",
        ("The chemical symbol for {el} is {sym}.", "{el} has the chemical symbol {sym}."),
        _items(
            "el sym",
            ("gold", "Au"), ("silver", "Ag"), ("iron", "Fe"), ("sodium", "Na"), ("oxygen", "O"),
            ("potassium", "K"), ("lead", "Pb"), ("copper", "Cu"), ("helium", "He"),
        ),
    ),
    _Chat(
        "chat/baby-animal", "heldout", "What is a baby {animal} called?",
        ("A baby {animal} is called a {baby}.", "A young {animal} is known as a {baby}."),
        _items(
            "animal baby",
            ("cat", "kitten"), ("dog", "puppy"), ("cow", "calf"), ("sheep", "lamb"), ("horse", "foal"),
            ("bear", "cub"), ("kangaroo", "joey"), ("duck", "duckling"), ("frog", "tadpole"),
        ),
    ),
)  # fmt: skip

_OFFTOPIC_FILLER = (
    "I really enjoy rainy afternoons with a good book and a cup of tea.",
    "Bananas are a good source of potassium and are easy to pack for lunch.",
    "The stock market had a volatile week, with tech shares leading the swings.",
    "My favorite movie is a science fiction film about a robot lost in space.",
    "Penguins live mostly in the Southern Hemisphere and cannot fly.",
    "Remember to back up your photos before updating your phone.",
)


def _wrong_fact(t: _Chat, rng: random.Random) -> tuple[str, str, str]:
    """The question about one item, answered in the same phrasing but with another item's answer."""
    item = rng.choice(t.items)
    phrasing = rng.choice(t.answers)
    # the answer fields: in the phrasing, not in the question (city, author, symbol, ...)
    keys = [k for k in item if "{" + k + "}" in phrasing and "{" + k + "}" not in t.question]
    others = [o for o in t.items if any(o[k] != item[k] for k in keys)]
    other = rng.choice(others)
    return (t.question.format(**item), _cap(phrasing.format(**item)),
            _cap(phrasing.format(**{**item, **{k: other[k] for k in keys}})))


def _chat_row(t: _Chat, rng: random.Random) -> tuple[str, str, str, str]:
    if rng.random() < 1 / 3:
        return (*_wrong_fact(t, rng), "chat-wrongfact")
    prompt, chosen = t.qa(rng)
    if rng.random() < 0.5:
        if rng.random() < 0.5:
            others = [o for o in _CHAT if o.group == t.group and o.tid != t.tid]
            rejected = rng.choice(others).qa(rng)[1]
        else:
            rejected = rng.choice(_OFFTOPIC_FILLER)
        return prompt, chosen, rejected, "chat-offtopic"
    words = chosen.split()
    cut = rng.randint(max(1, len(words) // 3), max(1, len(words) - 2))
    return prompt, chosen, " ".join(words[:cut]).rstrip(",;:."), "chat-truncated"


