"""Generate the embedded `tiny` corpus and train its tokenizer (deterministic, no downloads).

    python -m data.corpus.generate            # rewrites tiny.jsonl.gz, tiny_chat.jsonl.gz, tokenizer/

The text is synthetic: a small invented world (people, towns, countries, pets) whose facts stay
consistent across documents, template stories with number/pronoun agreement, arithmetic, counting
and question/answer pairs. A tiny transformer picks up the grammar within seconds, the templates and
recurring facts within a minute of CPU, which is what the `tiny` preset needs to show learning.
Everything comes from `random.Random(SEED)`: the same code gives byte-identical files.
"""

from __future__ import annotations

import gzip
import io
import json
import random
from dataclasses import dataclass
from pathlib import Path

SEED = 20261125
NUM_DOCS = 9000  # plain-text documents (about 2.6 MB of text, 0.4 MB gzipped)
NUM_CHATS = 3000  # chat conversations
HERE = Path(__file__).resolve().parent

SYLLABLES = [
    "ka",
    "mi",
    "to",
    "ren",
    "sa",
    "lo",
    "vi",
    "dar",
    "ne",
    "bel",
    "qu",
    "or",
    "tes",
    "fa",
    "lin",
    "mo",
]
JOBS = ["baker", "fisher", "teacher", "farmer", "painter", "doctor", "builder", "singer", "weaver", "miller"]
FOODS = ["plum soup", "bread", "fish stew", "apple pie", "rice", "cheese", "honey cake", "bean salad"]
PETS = ["dog", "cat", "goat", "parrot", "rabbit", "horse"]
GOODS = ["glass", "wool", "salt", "paper", "clocks", "boats", "wine", "pottery"]
COLORS = ["red", "blue", "green", "yellow", "white", "black", "brown"]
# (singular, plural) so stories can agree with the number in front of them
THINGS = [
    ("apple", "apples"),
    ("box", "boxes"),
    ("cherry", "cherries"),
    ("loaf", "loaves"),
    ("fish", "fish"),
    ("book", "books"),
    ("cup", "cups"),
    ("candle", "candles"),
    ("egg", "eggs"),
    ("knife", "knives"),
]
PLACES = ["market", "river", "library", "bakery", "harbor", "garden", "bridge", "school"]
WEATHER = ["sunny", "rainy", "windy", "cold", "warm", "foggy"]
FEELINGS = ["happy", "tired", "hungry", "proud", "calm", "curious"]
NUMBER_WORDS = [
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
SYSTEM_PROMPTS = ["You are a helpful assistant.", "Answer briefly.", "You know the towns of the valley well."]


@dataclass(frozen=True)
class Person:
    name: str
    she: bool
    job: str
    town: str
    food: str
    pet: str
    pet_name: str
    height: int  # only used to order people in comparisons

    @property
    def subj(self) -> str:
        return "she" if self.she else "he"

    @property
    def obj(self) -> str:
        return "her" if self.she else "him"

    @property
    def poss(self) -> str:
        return "her" if self.she else "his"


@dataclass(frozen=True)
class Town:
    name: str
    country: str
    river: str
    good: str


def _word(rng: random.Random, parts: int) -> str:
    return "".join(rng.choice(SYLLABLES) for _ in range(parts)).capitalize()


def _unique_words(rng: random.Random, n: int, parts: int, taken: set[str]) -> list[str]:
    out: list[str] = []
    while len(out) < n:
        w = _word(rng, parts)
        if w not in taken:
            taken.add(w)
            out.append(w)
    return out


def build_world(rng: random.Random) -> tuple[list[Person], list[Town], dict[str, str]]:
    """The fixed facts every document draws from: 6 countries, 16 towns, 48 people."""
    taken: set[str] = set()
    countries = _unique_words(rng, 6, 3, taken)
    capitals = dict(zip(countries, _unique_words(rng, 6, 2, taken), strict=True))
    rivers = _unique_words(rng, 8, 2, taken)
    towns = [
        Town(n, rng.choice(countries), rng.choice(rivers), rng.choice(GOODS)) for n in _unique_words(rng, 16, 2, taken)
    ]
    names = _unique_words(rng, 48, 2, taken)
    pet_names = _unique_words(rng, 48, 2, taken)
    people = [
        Person(
            n,
            rng.random() < 0.5,
            rng.choice(JOBS),
            rng.choice(towns).name,
            rng.choice(FOODS),
            rng.choice(PETS),
            pn,
            rng.randrange(140, 200),
        )
        for n, pn in zip(names, pet_names, strict=True)
    ]
    return people, towns, capitals


def _count(n: int, thing: tuple[str, str]) -> str:
    word = NUMBER_WORDS[n] if n < len(NUMBER_WORDS) else str(n)
    return f"{word} {thing[0] if n == 1 else thing[1]}"


def _a(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


class Writer:
    """One method per document kind; `document()` picks one at random."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.people, self.towns, self.capitals = build_world(rng)
        self.town_of = {t.name: t for t in self.towns}

    def profile(self) -> str:
        p = self.rng.choice(self.people)
        s = [
            f"{p.name} is {_a(p.job)} from {p.town}.",
            f"{p.subj.capitalize()} has {_a(p.pet)} named {p.pet_name}.",
            f"{p.poss.capitalize()} favorite food is {p.food}.",
            f"{p.name} lives near the {self.rng.choice(PLACES)}.",
        ]
        self.rng.shuffle(s)
        return " ".join(s[: self.rng.randint(2, 4)])

    def geography(self) -> str:
        t = self.rng.choice(self.towns)
        s = [
            f"{t.name} is a town in {t.country}.",
            f"The river {t.river} runs through {t.name}.",
            f"{t.name} is known for its {t.good}.",
            f"The capital of {t.country} is {self.capitals[t.country]}.",
        ]
        return " ".join(s[: self.rng.randint(2, 4)])

    def story(self) -> str:
        r = self.rng
        p, q = r.sample(self.people, 2)
        a, b = r.sample(THINGS, 2)
        na, nb = r.randint(1, 9), r.randint(1, 9)
        s = [
            f"One {r.choice(DAYS)} morning, {p.name} walked to the {r.choice(PLACES)} in {p.town}.",
            f"The day was {r.choice(WEATHER)}.",
            f"{p.subj.capitalize()} bought {_count(na, a)} and {_count(nb, b)}.",
            f"On the way home {p.subj} met {q.name}, the {q.job}.",
            f"{q.name} was {r.choice(FEELINGS)} and talked about {q.poss} {q.pet}, {q.pet_name}.",
            f"{p.name} gave {q.name} {_count(1, a)}, so {p.subj} kept {_count(na - 1, a)}.",
            f"Then {p.subj} went home and ate {p.food}.",
        ]
        return " ".join(s)

    def arithmetic(self) -> str:
        r, lines = self.rng, []
        for _ in range(r.randint(3, 8)):
            x, y, op = r.randint(0, 50), r.randint(0, 50), r.choice("+-*")
            if op == "-" and y > x:
                x, y = y, x
            if op == "*":
                x, y = x % 13, y % 13
            lines.append(f"{x} {op} {y} = {eval(f'{x}{op}{y}')}")  # noqa: S307 - digits and one operator
        return "\n".join(lines)

    def word_problem(self) -> str:
        r = self.rng
        p, q = r.sample(self.people, 2)
        t = r.choice(THINGS)
        x, y = r.randint(1, 9), r.randint(1, 9)
        if r.random() < 0.5:
            return (
                f"{p.name} has {_count(x, t)}. {q.name} gives {p.obj} {_count(y, t)} more. "
                f"Now {p.name} has {x + y} {t[1] if x + y != 1 else t[0]}."
            )
        x = x + y
        return (
            f"{p.name} has {_count(x, t)}. {p.subj.capitalize()} gives {_count(y, t)} to {q.name}. "
            f"Now {p.name} has {_count(x - y, t)}."
        )

    def counting(self) -> str:
        r = self.rng
        step, start = r.randint(1, 9), r.randint(0, 20)
        n = r.randint(5, 12)
        seq = ", ".join(str(start + i * step) for i in range(n))
        if r.random() < 0.3:
            i = r.randrange(7)
            return f"After {DAYS[i]} comes {DAYS[(i + 1) % 7]}. The days of the week are {', '.join(DAYS)}."
        return f"Counting by {step} from {start}: {seq}."

    def comparison(self) -> str:
        a, b, c = sorted(self.rng.sample(self.people, 3), key=lambda p: -p.height)
        return (
            f"{a.name} is taller than {b.name}. {b.name} is taller than {c.name}. "
            f"So {a.name} is taller than {c.name}, and {c.name} is the shortest of the three."
        )

    def qa(self) -> str:
        return "\n".join(f"Q: {q}\nA: {a}" for q, a in (self.question() for _ in range(self.rng.randint(2, 4))))

    def question(self) -> tuple[str, str]:
        r = self.rng
        p, t = r.choice(self.people), r.choice(self.towns)
        kind = r.randrange(6)
        if kind == 0:
            return f"Where does {p.name} live?", f"{p.name} lives in {p.town}."
        if kind == 1:
            return f"What is {p.name}'s job?", f"{p.name} is {_a(p.job)}."
        if kind == 2:
            return (
                f"What is the name of {p.name}'s {p.pet}?",
                f"{p.poss.capitalize()} {p.pet} is named {p.pet_name}.",
            )
        if kind == 3:
            return f"Which country is {t.name} in?", f"{t.name} is in {t.country}."
        if kind == 4:
            return (
                f"What is the capital of {t.country}?",
                f"The capital of {t.country} is {self.capitals[t.country]}.",
            )
        x, y = r.randint(0, 30), r.randint(0, 30)
        return f"What is {x} plus {y}?", f"{x} plus {y} is {x + y}."

    def document(self) -> str:
        kinds = [
            self.profile,
            self.geography,
            self.story,
            self.arithmetic,
            self.word_problem,
            self.counting,
            self.comparison,
            self.qa,
        ]
        weights = [3, 2, 4, 2, 2, 1, 1, 3]
        parts = [self.rng.choices(kinds, weights)[0]() for _ in range(self.rng.randint(1, 3))]
        return "\n\n".join(parts)

    def chat(self) -> list[dict[str, str]]:
        msgs = [{"role": "system", "content": self.rng.choice(SYSTEM_PROMPTS)}] if self.rng.random() < 0.3 else []
        for _ in range(self.rng.randint(1, 3)):
            q, a = self.question()
            msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        return msgs


def write_jsonl_gz(path: Path, rows: list[dict]) -> None:
    """gzip with mtime 0 and no file name in the header, so reruns give identical bytes."""
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0, compresslevel=9) as f:
        for row in rows:
            f.write((json.dumps(row, ensure_ascii=False) + "\n").encode())
    path.write_bytes(buf.getvalue())


def generate(num_docs: int = NUM_DOCS, num_chats: int = NUM_CHATS, seed: int = SEED) -> tuple[list[dict], list[dict]]:
    """The plain-text rows ({"text"}) and chat rows ({"messages"}), deterministic in `seed`."""
    w = Writer(random.Random(seed))
    docs = [{"text": w.document()} for _ in range(num_docs)]
    chats = [{"messages": w.chat()} for _ in range(num_chats)]
    return docs, chats


def main() -> None:
    from data.corpus.tokenizer_train import train_tokenizer

    docs, chats = generate()
    write_jsonl_gz(HERE / "tiny.jsonl.gz", docs)
    write_jsonl_gz(HERE / "tiny_chat.jsonl.gz", chats)
    texts = [d["text"] for d in docs] + [m["content"] for c in chats for m in c["messages"]]
    train_tokenizer(texts, HERE / "tokenizer")
    print(f"{len(docs)} documents, {sum(len(d['text']) for d in docs)} characters; {len(chats)} chats")


if __name__ == "__main__":
    main()
