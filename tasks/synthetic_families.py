"""The task families of the built-in synthetic FLAN-style mixture: generators and templates.

Everything here is plain Python generated from a seed, so the demo runs with nothing
downloaded. The families are designed for a *tiny* model (d_model 128, 1k sentencepiece
vocabulary, a few hundred steps): answers are 1-5 words, operations work on whole words
rather than characters, and the word lists are small, so a tuned model can clearly beat an
untrained one while the tasks still differ in what they ask.

A family is a generator `(random.Random) -> dict of fields` (an `answer` field, and an
`options` list for classification) plus instruction templates in FLAN's style: five used
for training and two held out for evaluation. Templates are `(inputs, targets)` pairs
whose `{field}` placeholders are filled by the data pipeline's safe renderer; `{options}`
shows the answer options in a style the pipeline picks per example (templates without it
are FLAN's no-options variant). Adding a family is ~15 lines: write the generator, write
seven templates, append it to `FAMILIES`.
"""

from __future__ import annotations

import dataclasses
import random
from typing import Callable

Fields = dict[str, object]

# Small closed vocabularies keep every word a few subword pieces in a 1k-token vocabulary.
ANIMALS = ["cat", "dog", "horse", "cow", "sheep", "lion", "tiger", "bear", "mouse", "duck", "fox", "wolf"]
FRUITS = ["apple", "banana", "orange", "grape", "lemon", "cherry", "pear", "peach", "melon", "plum", "mango", "kiwi"]
COLORS = ["red", "blue", "green", "yellow", "black", "white", "pink", "brown", "purple", "gray", "gold", "silver"]
VEHICLES = ["car", "bus", "train", "boat", "plane", "truck", "bike", "ship", "taxi", "van", "tram", "rocket"]
CATEGORIES = {"animal": ANIMALS, "fruit": FRUITS, "color": COLORS, "vehicle": VEHICLES}
NAMES = ["Anna", "Ben", "Carlos", "Diana", "Emma", "Farid", "Grace", "Hugo", "Ines", "Jack", "Kira", "Leo",
         "Maria", "Nina", "Omar", "Paul", "Rosa", "Sam", "Tom", "Vera"]
CITIES = ["Paris", "London", "Rome", "Berlin", "Madrid", "Tokyo", "Cairo", "Lima", "Oslo", "Dublin",
          "Vienna", "Prague", "Lisbon", "Athens", "Boston", "Sydney"]
JOBS = ["teacher", "doctor", "farmer", "pilot", "singer", "baker", "lawyer", "nurse", "painter", "writer",
        "chef", "driver", "dentist", "engineer"]
# The list tasks also use the held-out cluster's cities and jobs, so that cluster tests an unseen
# skill (extraction), not words the tokenizer and the model have never seen.
WORDS = ANIMALS + FRUITS + COLORS + VEHICLES + CITIES + JOBS
POSITIVE = ["great", "wonderful", "excellent", "lovely", "amazing", "fantastic", "perfect", "delightful"]
NEGATIVE = ["terrible", "awful", "horrible", "boring", "disappointing", "bad", "dreadful", "poor"]
SUBJECTS = ["food", "movie", "hotel", "book", "concert", "service", "game", "trip", "show", "room"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September",
          "October", "November", "December"]
ONES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
        "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen"]
TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]


@dataclasses.dataclass(frozen=True)
class Family:
    """One synthetic task family: how to draw an example and how to phrase it."""

    name: str
    cluster: str
    generate: Callable[[random.Random], Fields]
    train_templates: tuple[tuple[str, str], ...]
    heldout_templates: tuple[tuple[str, str], ...]

    @property
    def has_options(self) -> bool:
        return any("{options}" in inputs for inputs, _ in self.train_templates + self.heldout_templates)


def number_to_words(n: int) -> str:
    """English words for 0 <= n <= 999 ("three hundred forty two"), without "and" or hyphens."""
    if not 0 <= n <= 999:
        raise ValueError(f"number_to_words supports 0..999, got {n}")
    words = []
    hundreds, rest = divmod(n, 100)
    if hundreds:
        words += [ONES[hundreds], "hundred"]
    if rest >= 20:
        words.append(TENS[rest // 10])
        if rest % 10:
            words.append(ONES[rest % 10])
    elif rest or not words:
        words.append(ONES[rest])
    return " ".join(words)


def _word_list(rng: random.Random, n: int) -> list[str]:
    return rng.sample(WORDS, n)


def _join(words: list[str]) -> str:
    return ", ".join(words)


# ----------------------------------------------------------------------------- arithmetic
def _addition(rng: random.Random) -> Fields:
    a, b = rng.randint(0, 60), rng.randint(0, 60)
    return {"a": a, "b": b, "answer": str(a + b)}


ADDITION = Family("addition", "arithmetic", _addition, (
    ("What is {a} plus {b}?", "{answer}"),
    ("Add {a} and {b}.", "{answer}"),
    ("Compute the sum of {a} and {b}.", "{answer}"),
    ("{a} + {b} = ?", "{answer}"),
    ("If you have {a} coins and find {b} more, how many coins do you have?", "{answer}"),
), (
    ("Calculate {a} + {b}. Answer with a number.", "{answer}"),
    ("What do you get when {b} is added to {a}?", "{answer}"),
))


def _subtraction(rng: random.Random) -> Fields:
    a = rng.randint(0, 99)
    b = rng.randint(0, min(a, 30))
    return {"a": a, "b": b, "answer": str(a - b)}


SUBTRACTION = Family("subtraction", "arithmetic", _subtraction, (
    ("What is {a} minus {b}?", "{answer}"),
    ("Subtract {b} from {a}.", "{answer}"),
    ("{a} - {b} = ?", "{answer}"),
    ("Compute the difference {a} - {b}.", "{answer}"),
    ("There were {a} birds on a tree and {b} flew away. How many birds are left?", "{answer}"),
), (
    ("Take {b} away from {a}. What remains?", "{answer}"),
    ("Calculate {a} - {b}. Answer with a number.", "{answer}"),
))


def _largest(rng: random.Random) -> Fields:
    numbers = rng.sample(range(100), rng.randint(3, 5))
    return {"numbers": _join([str(n) for n in numbers]), "answer": str(max(numbers))}


LARGEST_NUMBER = Family("largest_number", "arithmetic", _largest, (
    ("Which is the largest number in this list: {numbers}?", "{answer}"),
    ("Numbers: {numbers}\nWhat is the maximum?", "{answer}"),
    ("Find the biggest number among {numbers}.", "{answer}"),
    ("Here are some numbers: {numbers}. Which one is the greatest?", "{answer}"),
    ("Return the highest value in [{numbers}].", "{answer}"),
), (
    ("Look at {numbers}. Name the largest of them.", "{answer}"),
    ("Out of {numbers}, which number is the biggest?", "{answer}"),
))


def _count_items(rng: random.Random) -> Fields:
    words = _word_list(rng, rng.randint(1, 9))
    return {"items": _join(words), "answer": str(len(words))}


COUNT_ITEMS = Family("count_items", "arithmetic", _count_items, (
    ("How many items are in this list: {items}?", "{answer}"),
    ("Count the words in the list below.\n{items}", "{answer}"),
    ("List: {items}\nHow many elements does it have?", "{answer}"),
    ("Tell me the number of things in [{items}].", "{answer}"),
    ("{items}\n\nHow many items were listed above?", "{answer}"),
), (
    ("What is the length of the list {items}?", "{answer}"),
    ("I wrote down {items}. How many things did I write?", "{answer}"),
))


# ----------------------------------------------------------------------------- word lists
def _last_item(rng: random.Random) -> Fields:
    words = _word_list(rng, rng.randint(2, 6))
    return {"items": _join(words), "answer": words[-1]}


LAST_ITEM = Family("last_item", "list_manipulation", _last_item, (
    ("What is the last item in this list: {items}?", "{answer}"),
    ("List: {items}\nWhich word comes last?", "{answer}"),
    ("Return the final element of [{items}].", "{answer}"),
    ("{items}\n\nWhat is the last word above?", "{answer}"),
    ("Name the item at the end of the list {items}.", "{answer}"),
), (
    ("Which element closes the list {items}?", "{answer}"),
    ("Read {items} and tell me the final word.", "{answer}"),
))


def _reverse(rng: random.Random) -> Fields:
    words = _word_list(rng, 3)
    return {"items": _join(words), "answer": _join(words[::-1])}


REVERSE_LIST = Family("reverse_list", "list_manipulation", _reverse, (
    ("Reverse the order of this list: {items}", "{answer}"),
    ("List: {items}\nWrite the list backwards.", "{answer}"),
    ("Write {items} in reverse order.", "{answer}"),
    ("{items}\n\nList the items above from last to first.", "{answer}"),
    ("Flip the order of the words in [{items}].", "{answer}"),
), (
    ("Start from the end and rewrite the list {items}.", "{answer}"),
    ("Give me {items} with the order reversed.", "{answer}"),
))


def _remove_item(rng: random.Random) -> Fields:
    words = _word_list(rng, rng.randint(3, 5))
    target = rng.choice(words)
    return {"items": _join(words), "word": target, "answer": _join([w for w in words if w != target])}


REMOVE_ITEM = Family("remove_item", "list_manipulation", _remove_item, (
    ("Remove {word} from this list: {items}", "{answer}"),
    ("List: {items}\nDelete the word {word} and write the rest.", "{answer}"),
    ("Write the list {items} without {word}.", "{answer}"),
    ("{items}\n\nDrop {word} from the list above.", "{answer}"),
    ("Take {word} out of [{items}].", "{answer}"),
), (
    ("Cross out {word} in {items}. What is left?", "{answer}"),
    ("Rewrite {items} leaving out {word}.", "{answer}"),
))


def _item_at(rng: random.Random) -> Fields:
    words = _word_list(rng, rng.randint(3, 6))
    position = rng.randint(1, len(words))
    return {"items": _join(words), "position": position, "answer": words[position - 1]}


ITEM_AT_POSITION = Family("item_at_position", "list_manipulation", _item_at, (
    ("What is item number {position} in this list: {items}?", "{answer}"),
    ("List: {items}\nReturn the word at position {position}.", "{answer}"),
    ("Counting from 1, which element of [{items}] is at index {position}?", "{answer}"),
    ("{items}\n\nWhich word is in position {position} above?", "{answer}"),
    ("Give me element {position} of the list {items}.", "{answer}"),
), (
    ("In {items}, what word sits at place {position}?", "{answer}"),
    ("Pick the item numbered {position} from {items}.", "{answer}"),
))


# ----------------------------------------------------------------------------- classification
def _sentiment(rng: random.Random) -> Fields:
    positive = rng.random() < 0.5
    adjective = rng.choice(POSITIVE if positive else NEGATIVE)
    name, subject = rng.choice(NAMES), rng.choice(SUBJECTS)
    text = f"{name} said the {subject} was {adjective}."
    return {"text": text, "options": ["positive", "negative"], "answer": "positive" if positive else "negative"}


SENTIMENT = Family("sentiment", "classification", _sentiment, (
    ("{text}\nIs this review positive or negative?\n{options}", "{answer}"),
    ("Review: {text}\nWhat is the sentiment of the review?\n{options}", "{answer}"),
    ("What is the sentiment of the following sentence?\n{text}", "{answer}"),
    ("{text}\n\nDid the speaker like it?\n{options}", "{answer}"),
    ("Classify the sentiment: {text}", "{answer}"),
), (
    ("Read this: {text}\nIs the tone positive or negative?\n{options}", "{answer}"),
    ("Sentence: {text}\nWould you call this opinion positive or negative?", "{answer}"),
))


def _pick_category(rng: random.Random) -> Fields:
    labels = rng.sample(sorted(CATEGORIES), rng.randint(2, 4))
    words = [rng.choice(CATEGORIES[label]) for label in labels]
    asked = rng.randrange(len(labels))
    order = rng.sample(range(len(words)), len(words))
    shuffled = [words[i] for i in order]
    return {"items": _join(shuffled), "category": labels[asked], "options": shuffled, "answer": words[asked]}


PICK_CATEGORY = Family("pick_category", "classification", _pick_category, (
    ("Which of these words is a {category}: {items}?", "{answer}"),
    ("Words: {items}\nWhich one is a {category}?\n{options}", "{answer}"),
    ("Pick the {category} from the list.\n{options}", "{answer}"),
    ("{items}\n\nOne of the words above names a {category}. Which one?", "{answer}"),
    ("Find the {category} among {items}.\n{options}", "{answer}"),
), (
    ("Choose the word that is a kind of {category}.\n{options}", "{answer}"),
    ("Among {items}, name the {category}.", "{answer}"),
))


def _parity(rng: random.Random) -> Fields:
    n = rng.randint(0, 999)
    return {"number": n, "options": ["even", "odd"], "answer": "even" if n % 2 == 0 else "odd"}


PARITY = Family("parity", "classification", _parity, (
    ("Is {number} even or odd?", "{answer}"),
    ("Number: {number}\nIs it even or odd?\n{options}", "{answer}"),
    ("Tell me whether {number} is an even number.\n{options}", "{answer}"),
    ("{number}\n\nClassify the number above as even or odd.", "{answer}"),
    ("What is the parity of {number}?\n{options}", "{answer}"),
), (
    ("Can {number} be divided by two without a remainder? Answer even or odd.\n{options}", "{answer}"),
    ("Decide if {number} is odd or even.", "{answer}"),
))


def _membership(rng: random.Random) -> Fields:
    words = _word_list(rng, rng.randint(2, 5) + 1)
    inside = rng.random() < 0.5
    word = rng.choice(words[:-1]) if inside else words[-1]
    return {"items": _join(words[:-1]), "word": word, "options": ["yes", "no"], "answer": "yes" if inside else "no"}


MEMBERSHIP = Family("membership", "classification", _membership, (
    ("Is {word} in the list {items}?\n{options}", "{answer}"),
    ("List: {items}\nDoes the list contain {word}?", "{answer}"),
    ("Check whether {word} appears in [{items}].\n{options}", "{answer}"),
    ("{items}\n\nIs the word {word} one of the items above?\n{options}", "{answer}"),
    ("Can you find {word} in {items}? Answer yes or no.", "{answer}"),
), (
    ("Here is a list: {items}. Is {word} part of it?\n{options}", "{answer}"),
    ("Does {items} include {word}?", "{answer}"),
))


# ----------------------------------------------------------------------------- format conversion
def _number_to_words(rng: random.Random) -> Fields:
    n = rng.randint(0, 999)
    return {"number": n, "answer": number_to_words(n)}


NUMBER_TO_WORDS = Family("number_to_words", "format_conversion", _number_to_words, (
    ("Write the number {number} in words.", "{answer}"),
    ("How do you spell out {number}?", "{answer}"),
    ("Number: {number}\nWords:", "{answer}"),
    ("Convert {number} from digits to English words.", "{answer}"),
    ("{number}\n\nWrite the number above in words.", "{answer}"),
), (
    ("Spell the number {number} with letters instead of digits.", "{answer}"),
    ("How would you say {number} out loud?", "{answer}"),
))


def _words_to_number(rng: random.Random) -> Fields:
    n = rng.randint(0, 999)
    return {"words": number_to_words(n), "answer": str(n)}


WORDS_TO_NUMBER = Family("words_to_number", "format_conversion", _words_to_number, (
    ("Write {words} as a number.", "{answer}"),
    ("Convert to digits: {words}", "{answer}"),
    ("Words: {words}\nNumber:", "{answer}"),
    ("What number is {words}?", "{answer}"),
    ("{words}\n\nWrite the number above with digits.", "{answer}"),
), (
    ("Turn the words {words} into digits.", "{answer}"),
    ("Express {words} using numerals.", "{answer}"),
))


def _date_format(rng: random.Random) -> Fields:
    year, month, day = rng.randint(1990, 2029), rng.randint(1, 12), rng.randint(1, 28)
    return {"date": f"{year}-{month:02d}-{day:02d}", "answer": f"{day} {MONTHS[month - 1]} {year}"}


DATE_FORMAT = Family("date_format", "format_conversion", _date_format, (
    ("Write the date {date} in words, like 5 March 2021.", "{answer}"),
    ("Convert {date} to day month year format.", "{answer}"),
    ("Date: {date}\nRewrite it with the month name.", "{answer}"),
    ("{date}\n\nHow would you write the date above in a letter?", "{answer}"),
    ("Reformat the ISO date {date} as day, month name and year.", "{answer}"),
), (
    ("Turn {date} into a readable date.", "{answer}"),
    ("Spell out the month in {date}.", "{answer}"),
))


# ----------------------------------------------------------------------------- extraction (held out)
def _person(rng: random.Random) -> Fields:
    name, city, job, pets = rng.choice(NAMES), rng.choice(CITIES), rng.choice(JOBS), rng.randint(1, 9)
    cats = "1 cat" if pets == 1 else f"{pets} cats"
    text = f"{name} is a {job} who lives in {city} and has {cats}."
    return {"text": text, "name": name, "city": city, "job": job, "pets": pets}


def _extract(field: str) -> Callable[[random.Random], Fields]:
    def generate(rng: random.Random) -> Fields:
        fields = _person(rng)
        return {**fields, "answer": str(fields[field])}

    generate.__name__ = f"_extract_{field}"
    return generate


EXTRACT_CITY = Family("extract_city", "extraction", _extract("city"), (
    ("{text}\nWhere does {name} live?", "{answer}"),
    ("Text: {text}\nWhich city is mentioned?", "{answer}"),
    ("Read the sentence and name the city.\n{text}", "{answer}"),
    ("{text}\n\nIn which city does {name} live?", "{answer}"),
    ("Extract the place from: {text}", "{answer}"),
), (
    ("From the text \"{text}\", what is the city?", "{answer}"),
    ("{text} Question: what is the home town of {name}?", "{answer}"),
))

EXTRACT_JOB = Family("extract_job", "extraction", _extract("job"), (
    ("{text}\nWhat is the job of {name}?", "{answer}"),
    ("Text: {text}\nWhat does {name} do for a living?", "{answer}"),
    ("Read the sentence and name the profession.\n{text}", "{answer}"),
    ("{text}\n\nWhat is {name}'s occupation?", "{answer}"),
    ("Extract the job from: {text}", "{answer}"),
), (
    ("From the text \"{text}\", what work does {name} do?", "{answer}"),
    ("{text} Question: what is the profession mentioned?", "{answer}"),
))

EXTRACT_COUNT = Family("extract_count", "extraction", _extract("pets"), (
    ("{text}\nHow many cats does {name} have?", "{answer}"),
    ("Text: {text}\nWhat number is mentioned?", "{answer}"),
    ("Read the sentence and give the number of cats.\n{text}", "{answer}"),
    ("{text}\n\nHow many cats are there?", "{answer}"),
    ("Extract the number from: {text}", "{answer}"),
), (
    ("From the text \"{text}\", how many cats are mentioned?", "{answer}"),
    ("{text} Question: what is the count of cats?", "{answer}"),
))


FAMILIES: tuple[Family, ...] = (
    ADDITION, SUBTRACTION, LARGEST_NUMBER, COUNT_ITEMS,
    LAST_ITEM, REVERSE_LIST, REMOVE_ITEM, ITEM_AT_POSITION,
    SENTIMENT, PICK_CATEGORY, PARITY, MEMBERSHIP,
    NUMBER_TO_WORDS, WORDS_TO_NUMBER, DATE_FORMAT,
    EXTRACT_CITY, EXTRACT_JOB, EXTRACT_COUNT,
)
HELDOUT_CLUSTER = "extraction"


def generate_splits(family: Family, num_train: int, num_validation: int, seed: int = 0
                    ) -> dict[str, list[Fields]]:
    """Draws distinct examples for a family and deals them into disjoint splits.

    Validation examples are drawn first, then training examples, and an example whose
    fields were already drawn is redrawn, so no validation question also appears in
    training. A family whose space of distinct examples is smaller than asked for gets
    fewer training examples rather than duplicates (the loop stops after many misses).
    Deterministic: the generator is seeded by the family name and `seed` only.
    """
    rng = random.Random(f"{family.name}/{seed}")
    seen: set[str] = set()
    drawn: list[Fields] = []
    wanted, misses = num_validation + num_train, 0
    while len(drawn) < wanted and misses < 20 * wanted:
        fields = family.generate(rng)
        key = repr(sorted((k, v) for k, v in fields.items() if k != "answer"))
        if key in seen:
            misses += 1
            continue
        seen.add(key)
        drawn.append(fields)
    if len(drawn) < num_validation + 1:
        raise ValueError(f"synthetic family {family.name!r} has too few distinct examples ({len(drawn)})")
    return {"validation": drawn[:num_validation], "train": drawn[num_validation:]}
