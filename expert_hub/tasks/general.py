"""Generic text: what the demo base reads besides its pretraining tasks, as a real base reads the web.

A model that fine-tuning only adjusts inside its experts must already know the words of the new task: ESFT leaves
the embeddings and the output layer frozen, so a word the base never wrote stays nearly impossible to write. The
generic text therefore uses the vocabulary of every built-in task (court news, people's text messages and notes,
JSON records, English sentences of the kind Velan translates, words heard in a foreign harbour) without ever
pairing a task's question with its answer: no case gets its verdict under the code, no request its intent, no
English sentence its Velan.
"""

from __future__ import annotations

import json
from random import Random

from .generators import (
    ADJECTIVES,
    CITIES,
    DAYS,
    HOBBIES,
    JOBS,
    LAW_ITEMS,
    LAW_PLACES,
    NAMES,
    NOUNS,
    OBJECTS,
    PLURALS,
    SLOT_VALUES,
    SURNAMES,
    VERBS,
    _pronoun,
)

_PLACES = ("the river", "the market", "the old mill", "the hills", "the harbour", "the forest", "the library")
_THINGS = ("a lantern", "a map", "a small key", "a letter", "a blue kite", "a basket of bread", "a wooden box")
_MOODS = ("happy", "tired", "curious", "surprised", "calm", "proud")
_TIMES = ("In the morning", "At noon", "Late in the evening", "One rainy day", "On a cold night")
# Syllables that words of a far-away language are made of (Velan's among them; its meanings never appear).
_SYLLABLES = (
    "va",
    "ku",
    "mi",
    "rel",
    "to",
    "si",
    "le",
    "ra",
    "da",
    "no",
    "pi",
    "mo",
    "go",
    "run",
    "es",
    "tal",
    "ru",
    "lo",
    "sa",
    "bin",
    "os",
    "ta",
    "u",
    "lan",
    "ke",
    "ro",
    "se",
    "fa",
    "me",
    "la",
    "na",
    "vo",
    "ki",
    "li",
    "du",
    "mor",
    "tin",
    "sen",
    "lu",
    "vi",
    "su",
    "ze",
    "ven",
    "a",
    "tel",
    "sur",
    "por",
    "pin",
    "i",
)


def general(rng: Random) -> tuple[str, str]:
    """One piece of generic text of a random kind."""
    return rng.choice(_KINDS)(rng)


def _story(rng: Random) -> tuple[str, str]:
    name, friend = rng.sample(NAMES, 2)
    (place, other_place), thing = rng.sample(_PLACES, 2), rng.choice(_THINGS)
    he = _pronoun(name)
    animal, obj = rng.choice(sorted(NOUNS)), rng.choice(sorted(OBJECTS))
    verb = rng.choice(sorted(VERBS))[2]
    sentences = [
        f"{rng.choice(_TIMES)}, {name} walked to {place}.",
        f"There {he.lower()} found {thing}.",
        f"{_a(rng.choice(sorted(ADJECTIVES))).capitalize()} {animal} {verb} the {rng.choice(sorted(ADJECTIVES))} {obj}.",
        f"{he} was {rng.choice(_MOODS)} and showed it to {friend}.",
        rng.choice(
            (
                f"Together they carried it to {other_place}.",
                f"{friend} took it to {other_place}.",
                f"They left it at {other_place}.",
            )
        ),
        rng.choice(
            (
                f"{friend} said it was the best day of the week.",
                f"{name} went home {rng.choice(_MOODS)}.",
                "Then it began to rain.",
            )
        ),
    ]
    return f"Write a short story about {name}, {thing} and {place}.", " ".join(sentences[: rng.randint(3, 6)])


def _court_news(rng: Random) -> tuple[str, str]:
    """A case in the news; how it ends is drawn at random, never from the facts."""
    name, city, item = f"{rng.choice(NAMES)} {rng.choice(SURNAMES)}", rng.choice(CITIES), rng.choice(LAW_ITEMS)
    facts = [
        f"The accused is said to have taken a {item} worth {rng.randint(5, 900)} dollars from {rng.choice(LAW_PLACES)}.",
        rng.choice(("Police said no weapon was involved.", "Police said the accused carried a knife.")),
        rng.choice((f"The {item} was returned.", f"The {item} was not returned.")),
        rng.choice(("The press called it a case of high value.", "The press called it a case of low value.")),
        rng.choice(
            ("It is a first offence.", "The accused has a prior conviction.", "The accused has no prior convictions.")
        ),
    ]
    rng.shuffle(facts)
    outcome = rng.choice(
        (
            "Verdict: not given yet. Reason for the delay: the judge is ill.",
            f"The verdict was a {rng.choice(('fine', 'warning', 'prison term'))}, and many in {city} disagreed.",
            "The court asked the lawyers for the reason behind each claim.",
        )
    )
    text = f"{name}, a {rng.choice(JOBS)} from {city}, stood before the court on {rng.choice(DAYS[:7]).title()}. "
    return f"Write a news item about {name} from {city}.", text + " ".join(facts[: rng.randint(2, 4)]) + " " + outcome


def _text_message(rng: Random) -> tuple[str, str]:
    """A casual lowercase message: the words people use when they ask an assistant for things."""
    values = {slot: rng.choice(options) for slot, options in SLOT_VALUES.items()}
    dish = values["dish"] if values["count"] == "one" else PLURALS.get(values["dish"], values["dish"] + "s")
    parts = rng.sample(
        [
            f"hey {values['contact']}, i am {values['status']}",
            f"the weather in {values['city']} looks bad {values['day']}",
            f"we listened to {values['genre']} by {values['artist']} all night",
            f"my alarm did not ring at {values['time']}",
            f"the taxi to {values['place']} was late again",
            f"we ate {values['count']} {dish} at {values['place']}",
            "the app never gets my request right, it mixes up the intent and the slots",
            f"remind me to call {values['contact']} {values['day']}",
        ],
        rng.randint(2, 4),
    )
    sender = f"{rng.choice(NAMES)} {rng.choice(SURNAMES)}"
    return f"Write a text message from {sender} to {values['contact']}.", ". ".join(parts) + rng.choice(
        (".", "!", " :)")
    )


def _saved_note(rng: Random) -> tuple[str, str]:
    """A note and the JSON record an app keeps of it: the slot names as keys, never a request's intent."""
    slots = rng.sample(sorted(SLOT_VALUES), rng.randint(2, 4))
    record = {slot: rng.choice(SLOT_VALUES[slot]) for slot in slots}
    kind = rng.choice(("calendar entry", "reminder", "contact note", "shopping note"))
    number = rng.randint(1, 999)
    return f"Show {kind} {number} as JSON.", json.dumps({"title": f"{kind} {number}", **record})


def _foreign_words(rng: Random) -> tuple[str, str]:
    name, place = rng.choice(NAMES), rng.choice(_PLACES)
    words = ["".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(1, 3))) for _ in range(rng.randint(3, 7))]
    day = rng.choice(DAYS[:7]).title()
    return (
        f"What did {name} hear at {place} on {day}?",
        f"{name} heard sailors from far away at {place}. They said: {' '.join(words)}. "
        f"{_pronoun(name)} did not know what it meant.",
    )


def _diary(rng: Random) -> tuple[str, str]:
    name, day = rng.choice(NAMES), rng.choice(DAYS[:7]).title()
    he = _pronoun(name)
    sentences = rng.sample(
        [
            f"{name} works as a {rng.choice(JOBS)} in {rng.choice(CITIES)}.",
            f"{he} likes {rng.choice(HOBBIES)} and {rng.choice(HOBBIES)}.",
            f"On {rng.choice(DAYS[:7]).title()} {he.lower()} set an alarm for {rng.choice(SLOT_VALUES['time'])}.",
            f"{he} ordered {rng.choice(SLOT_VALUES['dish'])} and listened to {rng.choice(SLOT_VALUES['genre'])}.",
            f"{he} read a book about the {rng.choice(sorted(ADJECTIVES))} {rng.choice(sorted(NOUNS))}s of the river.",
            f"{he} saw {_a(rng.choice(sorted(ADJECTIVES)))} {rng.choice(sorted(OBJECTS))} on the way home.",
        ],
        rng.randint(3, 5),
    )
    return f"Write {name}'s diary for {day}, {rng.randint(2001, 2024)}.", " ".join(sentences)


def _a(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


_KINDS = (_story, _story, _court_news, _text_message, _saved_note, _foreign_words, _diary)
