"""A closed English vocabulary and a seeded sentence generator over it.

The built-in tiny models are trained on a closed domain: greetings, small numbers and arithmetic,
"repeat after me" and plain sentences over a few hundred words. The same generator feeds the codec
corpus (any sentence will do there) and, later, the language model's dialogues, so every sentence
either model hears is built from :data:`WORDS`.
"""

from __future__ import annotations

import random


def _words(text: str) -> list[str]:
    return text.split()


NUMBERS = _words(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
    "sixteen seventeen eighteen nineteen twenty"
)

GREETINGS = ("hello", "hi there", "good morning", "good afternoon", "good evening", "hey")

NOUNS = _words(
    "apple bird boat book box bread bridge car cat chair child city cloud coat cup day dog door dream egg "
    "eye face farm field fire fish floor flower friend garden girl glass goat hand hat heart hill horse "
    "house island key king lake lamp leaf letter light lion map milk moon morning mountain mouse music "
    "name night ocean orange paper park pen phone picture plane plant rain river road rock room rose "
    "school sea ship shoe sky snow song star stone street sun table teacher tiger town train tree truck "
    "voice wall water window winter wolf word world year boy man woman baby kitchen forest desk"
)

ADJECTIVES = _words(
    "big small red blue green yellow black white old new young happy sad quiet loud warm cold bright dark "
    "soft hard fast slow tall short kind brave clever funny gentle heavy light clean busy calm early late "
    "empty full fresh sweet"
)

VERBS = _words(  # third person singular:past
    "sees:saw finds:found likes:liked wants:wanted takes:took holds:held makes:made paints:painted "
    "follows:followed watches:watched opens:opened closes:closed carries:carried loves:loved "
    "visits:visited cleans:cleaned builds:built draws:drew reads:read brings:brought"
)

INTRANSITIVE = _words(  # third person singular:past
    "sleeps:slept sings:sang runs:ran walks:walked jumps:jumped waits:waited smiles:smiled "
    "laughs:laughed swims:swam dances:danced rests:rested listens:listened"
)

PLACES = (
    "in the garden", "by the river", "on the hill", "near the house", "at school", "in the city",
    "under the tree", "on the table", "in the kitchen", "at night", "in the morning", "by the sea",
)

ADVERBS = _words(
    "today yesterday again slowly quickly quietly often never always soon"
)

REPEATABLE = NOUNS + ADJECTIVES + NUMBERS


def _forms(pairs: list[str]) -> list[tuple[str, str]]:
    return [tuple(p.split(":")) for p in pairs]  # type: ignore[misc]


def _all_words() -> frozenset[str]:
    words: set[str] = set(NUMBERS) | set(NOUNS) | set(ADJECTIVES) | set(ADVERBS)
    for pair in VERBS + INTRANSITIVE:
        words.update(pair.split(":"))
    for phrase in (*GREETINGS, *PLACES):
        words.update(phrase.split())
    words.update(_words(
        "the a an my your is was what plus minus comes after before repeat me please how are you i am fine "
        "thank and it can say"
    ))
    return frozenset(words)


#: Every word a generated sentence can contain.
WORDS = _all_words()


class SentenceGenerator:
    """Sentences over :data:`WORDS`, the same sequence for the same seed (its own ``random.Random``)."""

    def __init__(self, seed: int):
        self.rng = random.Random(seed)
        self._verbs = _forms(VERBS)
        self._intransitive = _forms(INTRANSITIVE)
        self._kinds = (
            (self.statement, 6), (self.question, 2), (self.arithmetic, 2), (self.greeting, 1),
            (self.repeat, 1), (self.counting, 1),
        )

    def sentence(self) -> str:
        kinds, weights = zip(*self._kinds, strict=True)
        return self.rng.choices(kinds, weights)[0]()

    def sentences(self, n: int) -> list[str]:
        return [self.sentence() for _ in range(n)]

    # --- kinds -----------------------------------------------------------------------------------
    def noun_phrase(self) -> str:
        r = self.rng
        det = r.choice(("the", "a", "my", "your"))
        words = [r.choice(ADJECTIVES), r.choice(NOUNS)] if r.random() < 0.5 else [r.choice(NOUNS)]
        if det == "a" and words[0][0] in "aeiou":
            det = "an"
        return " ".join([det, *words])

    def statement(self) -> str:
        r = self.rng
        subject = self.noun_phrase()
        tense = r.randrange(2)
        if r.random() < 0.6:
            verb = r.choice(self._verbs)[tense]
            text = f"{subject} {verb} {self.noun_phrase()}"
        else:
            verb = r.choice(self._intransitive)[tense]
            text = f"{subject} {verb}"
        if r.random() < 0.5:
            text += " " + r.choice(PLACES)
        if r.random() < 0.3:
            text += " " + r.choice(ADVERBS)
        return text[0].upper() + text[1:] + "."

    def question(self) -> str:
        r = self.rng
        noun = r.choice(NOUNS)
        return r.choice((
            f"What is the {noun}?", f"Is the {noun} {r.choice(ADJECTIVES)}?", "How are you?",
            f"What comes after {r.choice(NUMBERS[:-1])}?", f"What comes before {r.choice(NUMBERS[1:])}?",
        ))

    def arithmetic(self) -> str:
        r = self.rng
        a, b = r.randrange(11), r.randrange(11)
        if r.random() < 0.5:
            return f"What is {NUMBERS[a]} plus {NUMBERS[b]}?"
        a, b = max(a, b), min(a, b)
        return f"What is {NUMBERS[a]} minus {NUMBERS[b]}?"

    def greeting(self) -> str:
        r = self.rng
        text = r.choice(GREETINGS)
        if r.random() < 0.5:
            text += r.choice((", how are you?", ", I am fine, thank you.", ", my friend."))
        return text[0].upper() + text[1:] + ("" if text.endswith((".", "?")) else ".")

    def repeat(self) -> str:
        return f"Repeat after me: {self.rng.choice(REPEATABLE)}."

    def counting(self) -> str:
        start = self.rng.randrange(15)
        return " ".join(NUMBERS[start : start + self.rng.randrange(3, 7)]).capitalize() + "."
