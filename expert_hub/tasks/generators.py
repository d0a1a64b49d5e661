"""Deterministic generators for the built-in tasks: each turns a seeded `random.Random` into one (question, answer).

The tasks follow the paper's spirit (math, code, intent, summary, law, translation) at a size a small model can
learn on a CPU: short prompts, answers fixed by explicit rules, vocabularies of a few hundred words. Everything
here is plain Python so that the same seed gives the same bytes on every machine.
"""

from __future__ import annotations

import json
from random import Random

NAMES = (
    "Ana",
    "Ben",
    "Carla",
    "Dev",
    "Eli",
    "Fatima",
    "Gus",
    "Hana",
    "Ivan",
    "Jun",
    "Kofi",
    "Lena",
    "Mateo",
    "Nora",
    "Omar",
    "Priya",
    "Quinn",
    "Rosa",
    "Sam",
    "Tara",
    "Umar",
    "Vera",
    "Wei",
    "Yara",
    "Zane",
)
SURNAMES = (
    "Silva",
    "Okafor",
    "Novak",
    "Tanaka",
    "Moreau",
    "Haddad",
    "Berg",
    "Rossi",
    "Kaur",
    "Lopez",
    "Meyer",
    "Petrov",
    "Dubois",
    "Sato",
    "Mensah",
    "Ward",
)
CITIES = (
    "Lisbon",
    "Oslo",
    "Lagos",
    "Lima",
    "Kyoto",
    "Cairo",
    "Quito",
    "Perth",
    "Porto",
    "Accra",
    "Hanoi",
    "Dublin",
    "Seoul",
    "Nairobi",
    "Madrid",
    "Tunis",
)
JOBS = (
    "baker",
    "nurse",
    "pilot",
    "teacher",
    "farmer",
    "painter",
    "chemist",
    "lawyer",
    "plumber",
    "writer",
    "dentist",
    "chef",
    "miner",
    "tailor",
    "driver",
    "singer",
)
HOBBIES = ("chess", "hiking", "cycling", "knitting", "fishing", "dancing", "poetry", "gardening", "surfing", "cooking")
PETS = ("a cat", "a dog", "two fish", "a parrot", "no pets", "a rabbit", "a turtle")
ITEMS = ("apples", "pears", "books", "coins", "shells", "stamps", "cards", "marbles", "eggs", "pencils")
WORDS = (
    "cat",
    "dog",
    "sun",
    "map",
    "red",
    "box",
    "cup",
    "hat",
    "pen",
    "bus",
    "sky",
    "tree",
    "moon",
    "fish",
    "lamp",
    "rock",
    "star",
    "ship",
    "door",
    "king",
)
DAYS = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday", "today", "tomorrow")


def _pronoun(name: str) -> str:
    return (
        "She"
        if name in ("Ana", "Carla", "Fatima", "Hana", "Lena", "Nora", "Priya", "Rosa", "Tara", "Vera", "Yara")
        else "He"
    )


def math(rng: Random) -> tuple[str, str]:
    """A two- or three-step word problem; the answer shows each step, then `The answer is N.`"""
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    total = rng.randint(2, 20)
    sentences, steps = [f"{name} has {total} {item}."], []
    for _ in range(rng.randint(2, 3)):
        kind = rng.choice(("add", "add", "sub", "sub", "mul"))
        if kind == "mul" and total <= 10:
            factor = rng.randint(2, 4)
            sentences.append(f"{_pronoun(name)} gets {factor} times as many.")
            steps.append(f"{total} * {factor} = {total * factor}.")
            total *= factor
        elif kind == "sub" and total > 1:
            amount = rng.randint(1, min(total - 1, 15))
            sentences.append(
                rng.choice((f"{_pronoun(name)} gives {amount} away.", f"{_pronoun(name)} loses {amount}."))
            )
            steps.append(f"{total} - {amount} = {total - amount}.")
            total -= amount
        else:
            amount = rng.randint(1, 15)
            sentences.append(
                rng.choice((f"{_pronoun(name)} buys {amount} more.", f"{_pronoun(name)} finds {amount} more."))
            )
            steps.append(f"{total} + {amount} = {total + amount}.")
            total += amount
    question = " ".join(sentences) + f" How many {item} does {name} have now?"
    return question, " ".join(steps) + f" The answer is {total}."


def code(rng: Random) -> tuple[str, str]:
    """A short Python program over a list, a word or a dict; the answer is what it prints."""
    result: object  # what the program prints: a number, a list, a dict or a string
    if rng.random() < 0.15:
        keys = rng.sample(WORDS, rng.randint(2, 3))
        word_counts = {key: rng.randint(0, 9) for key in keys}
        key = rng.choice(keys)
        expression, result = rng.choice(
            (
                (f"word_counts[{key!r}]", word_counts[key]),
                ("word_counts", word_counts),
                ("json.dumps(word_counts)", json.dumps(word_counts)),
                ("len(word_counts)", len(word_counts)),
            )
        )
        program = f"import json\nword_counts = {word_counts}\nprint({expression})"
    elif rng.random() < 0.6:
        values = [rng.randint(0, 9) for _ in range(rng.randint(3, 5))]
        expression, result = rng.choice(
            (
                ("sum(x)", sum(values)),
                ("max(x)", max(values)),
                ("min(x)", min(values)),
                ("len(x)", len(values)),
                ("x[0]", values[0]),
                ("x[1]", values[1]),
                ("x[-1]", values[-1]),
                ("sorted(x)", sorted(values)),
                ("x[::-1]", values[::-1]),
                ("x[0] + x[-1]", values[0] + values[-1]),
            )
        )
        program = f"x = {values}\nprint({expression})"
    else:
        word, other = rng.choice(WORDS), rng.choice(WORDS)
        expression, result, uses_t = rng.choice(
            (
                ("s.upper()", word.upper(), False),
                ("s[0]", word[0], False),
                ("len(s)", len(word), False),
                ("s + t", word + other, True),
                ("s[-1]", word[-1], False),
                ("t + s", other + word, True),
            )
        )
        second = f"t = {other!r}\n" if uses_t else ""
        program = f"s = {word!r}\n{second}print({expression})"
    return f"What does this Python program print?\n{program}", str(result)


def summary(rng: Random) -> tuple[str, str]:
    """A shuffled record with distractor fields; the answer keeps the key facts in one fixed sentence."""
    name, age = f"{rng.choice(NAMES)} {rng.choice(SURNAMES)}", rng.randint(19, 80)
    city, job, hobby = rng.choice(CITIES), rng.choice(JOBS), rng.choice(HOBBIES)
    fields = [f"Name: {name}", f"Age: {age}", f"City: {city}", f"Job: {job}", f"Hobby: {hobby}"]
    fields += rng.sample(
        [f"ID: {rng.randint(1000, 9999)}", f"Pets: {rng.choice(PETS)}", f"Joined: {rng.randint(2001, 2024)}"],
        rng.randint(0, 2),
    )
    rng.shuffle(fields)
    record = "\n".join(fields)
    return (
        f"Summarize the record in one sentence.\n{record}",
        f"{name}, {age}, is a {job} in {city} who enjoys {hobby}.",
    )


LAW_ITEMS = ("bicycle", "phone", "wallet", "laptop", "watch", "camera", "guitar", "jacket", "radio", "painting")
LAW_PLACES = ("a shop", "a neighbour", "a market stall", "an office", "a parked car", "a school", "a hotel room")


def law(rng: Random) -> tuple[str, str]:
    """Case facts in shuffled order; the verdict follows a small written code, and the answer names the rule.

    The code: a weapon means prison; otherwise goods worth 100 dollars or more mean prison with a prior
    conviction and a fine without; cheaper goods mean a fine with a prior conviction, a warning when the goods
    were returned, and a fine otherwise.
    """
    item, place, value = (
        rng.choice(LAW_ITEMS),
        rng.choice(LAW_PLACES),
        rng.choice((rng.randint(5, 99), rng.randint(100, 900))),
    )
    weapon, prior, returned = rng.random() < 0.2, rng.random() < 0.4, rng.random() < 0.5
    facts = [
        f"The accused took a {item} worth {value} dollars from {place}.",
        "The accused carried a knife." if weapon else "No weapon was involved.",
        "The accused has a prior conviction." if prior else "The accused has no prior convictions.",
        f"The {item} was returned." if returned else f"The {item} was not returned.",
    ]
    first, rest = facts[0], facts[1:]
    rng.shuffle(rest)
    if weapon:
        verdict, reason = "prison", "a weapon was involved"
    elif value >= 100:
        verdict, reason = (
            ("prison", "high value and a prior conviction") if prior else ("fine", "high value, first offence")
        )
    elif prior:
        verdict, reason = "fine", "low value with a prior conviction"
    else:
        verdict, reason = (
            ("warning", "low value, first offence, returned") if returned else ("fine", "low value, not returned")
        )
    return "Give the verdict under the code.\n" + " ".join([first, *rest]), f"Verdict: {verdict}. Reason: {reason}."


INTENTS = {
    "set_alarm": (
        ("wake me up at {time} {day}", "set an alarm for {time} {day}", "alarm at {time} {day} please"),
        ("time", "day"),
    ),
    "get_weather": (
        ("what is the weather in {city} {day}", "will it rain in {city} {day}", "weather for {city} {day}"),
        ("city", "day"),
    ),
    "play_music": (
        ("play some {genre} by {artist}", "put on {artist}, {genre} please", "i want {genre} from {artist}"),
        ("artist", "genre"),
    ),
    "book_taxi": (
        (
            "get me a taxi to {place} at {time}",
            "book a cab to {place} for {time}",
            "i need a ride to {place} at {time}",
        ),
        ("place", "time"),
    ),
    "send_message": (
        (
            "text {contact} that i am {status}",
            "tell {contact} i am {status}",
            "send {contact} a message saying i am {status}",
        ),
        ("contact", "status"),
    ),
    "order_food": (
        ("order {count} {dish}", "i would like {count} {dish} delivered", "get me {count} {dish}"),
        ("count", "dish"),
    ),  # `dish` agrees with `count`: one pizza, two pizzas
}
SLOT_VALUES = {
    "time": tuple(f"{hour} {half}" for hour in range(1, 13) for half in ("am", "pm")),
    "day": DAYS,
    "city": tuple(city.lower() for city in CITIES),
    "genre": ("jazz", "rock", "salsa", "blues", "reggae", "folk", "techno", "opera"),
    "artist": ("nina simone", "the beatles", "bob marley", "miles davis", "adele", "fela kuti", "abba", "bach"),
    "place": ("the airport", "the station", "the office", "the museum", "the beach", "the hospital", "the park"),
    "contact": ("mom", "dad", "alex", "my boss", "maria", "the team", "grandma", "li"),
    "status": ("running late", "on my way", "at home", "stuck in traffic", "almost there", "feeling sick"),
    "count": ("one", "two", "three", "four", "five"),
    "dish": ("pizza", "burger", "salad", "noodle bowl", "taco", "curry", "sandwich"),
}
PLURALS = {"curry": "curries", "sandwich": "sandwiches"}


def intent(rng: Random) -> tuple[str, str]:
    """A spoken request; the answer is its JSON intent and slots, one line, as the reference intent task."""
    name = rng.choice(sorted(INTENTS))
    templates, slot_names = INTENTS[name]
    slots = {slot: rng.choice(SLOT_VALUES[slot]) for slot in slot_names}
    if slots.get("count", "one") != "one":
        slots["dish"] = PLURALS.get(slots["dish"], slots["dish"] + "s")
    utterance = rng.choice(templates).format(**slots)
    return f"Parse the request into JSON.\n{utterance}", json.dumps({"intent": name, "slots": slots})


# Velan, a constructed language: subject-object-verb order, adjectives after their noun, plurals in -i, the
# past tense in -ta, no articles.
NOUNS = {
    "dog": "vaku",
    "cat": "mirel",
    "bird": "tosi",
    "girl": "lera",
    "boy": "dano",
    "sailor": "pimo",
    "farmer": "gorun",
    "horse": "estal",
    "baker": "rulo",
    "teacher": "sabin",
}
OBJECTS = {
    "house": "osta",
    "river": "ulan",
    "tree": "kero",
    "book": "sefa",
    "apple": "mela",
    "boat": "navo",
    "stone": "kivo",
    "song": "lidu",
} | NOUNS
ADJECTIVES = {
    "big": "mor",
    "small": "tin",
    "red": "ruva",
    "old": "sen",
    "happy": "lumi",
    "green": "vira",
    "quiet": "susi",
    "fast": "zeki",
}
# English forms (singular present, plural present, past) -> the Velan stem.
VERBS = {
    ("sees", "see", "saw"): "ven",
    ("likes", "like", "liked"): "ami",
    ("finds", "find", "found"): "tel",
    ("follows", "follow", "followed"): "sur",
    ("carries", "carry", "carried"): "porta",
    ("draws", "draw", "drew"): "pinta",
}


def translation(rng: Random) -> tuple[str, str]:
    """An English sentence and its Velan translation."""

    def phrase(lexicon: dict[str, str]) -> tuple[str, str, bool]:
        noun = rng.choice(sorted(lexicon))
        adjective = rng.choice(sorted(ADJECTIVES)) if rng.random() < 0.6 else None
        plural = rng.random() < 0.3
        english = "the " + (f"{adjective} " if adjective else "") + noun + ("s" if plural else "")
        velan = lexicon[noun] + ("i" if plural else "") + (f" {ADJECTIVES[adjective]}" if adjective else "")
        return english, velan, plural

    subject, subject_velan, plural = phrase(NOUNS)
    obj, object_velan, _ = phrase(OBJECTS)
    forms = rng.choice(sorted(VERBS))
    past = rng.random() < 0.4
    english_verb = forms[2] if past else forms[1] if plural else forms[0]
    velan_verb = VERBS[forms] + ("ta" if past else "")
    return f"Translate to Velan: {subject} {english_verb} {obj}.", f"{subject_velan} {object_velan} {velan_verb}."
