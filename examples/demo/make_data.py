"""Write the demo data set: restaurant booking requests -> one line of JSON.

The user writes a free-text booking request; the assistant answers with only
``{"name":...,"guests":...,"day":...,"time":...}``. The base model chats back instead,
so it scores ~0 %; after the demo fine-tune it extracts the fields. Besides the
format, a few normalisations have to be learned, not copied: number words become
integers ("four" -> 4), days are spelled out ("fri" -> "Friday") and times get one
spelling ("7 pm", "7.30pm" -> "7:00pm", "7:30pm").

Held-out requests use first and last names that never occur in training, so the
score there measures generalisation, not recall. Deterministic and stdlib-only:

    python examples/demo/make_data.py   # rewrites train.jsonl and heldout.jsonl beside it
"""

from __future__ import annotations

import json
import random
from pathlib import Path

SEED = 1234
N_TRAIN = 480  # one epoch of the demo recipe: 60 steps x batch 8
N_HELDOUT = 64
HERE = Path(__file__).resolve().parent

FIRST_NAMES = [
    "Alice", "Omar", "Priya", "Lucas", "Mei", "Jonas", "Fatima", "Diego", "Hannah", "Kofi",
    "Sofia", "Ivan", "Aisha", "Mateo", "Yuki", "Liam", "Chloe", "Ravi", "Elena", "Samuel",
    "Nadia", "Tomas", "Grace", "Hugo", "Leila", "Felix", "Amara", "Oscar", "Ingrid", "Marco",
    "Zara", "Pablo", "Clara", "Emeka", "Rosa", "Anton", "Julia", "Kenji", "Maya", "Victor",
    # held-out first names (never in training)
    "Beatrix", "Tariq", "Svetlana", "Rohan", "Greta", "Malik", "Ottilie", "Bruno",
    "Keiko", "Idris", "Marisol", "Lars",
]
LAST_NAMES = [
    "Moreno", "Haddad", "Sharma", "Berg", "Chen", "Weber", "Khan", "Torres", "Fischer", "Mensah",
    "Rossi", "Petrov", "Bello", "Garcia", "Tanaka", "Walsh", "Dubois", "Iyer", "Popescu", "Cohen",
    "Nasser", "Novak", "Kim", "Laurent", "Farah", "Brandt", "Okafor", "Lindqvist", "Hansen",
    "Ricci",
    "Ahmed", "Ortega", "Meyer", "Eze", "Silva", "Varga", "Costa", "Mori", "Patel", "Nowak",
    # held-out last names (never in training)
    "Quintero", "Abernathy", "Volkova", "Desai", "Kowalczyk", "Oyelaran", "Fairweather",
    "Lindgren", "Sato", "Mbeki", "Castellano", "Hargreaves",
]
N_TRAIN_NAMES = 40  # the first 40 of each list are training names, the rest held-out

DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
NUMBER_WORDS = {
    2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven",
    8: "eight", 9: "nine", 10: "ten", 11: "eleven", 12: "twelve",
}
PM_HOURS = [12, 1, 2, 5, 6, 7, 8, 9, 10]  # lunch and dinner
MINUTES = [0, 15, 30, 45]

# {n}: name, {g}: guests, {d}: day, {t}: time
TEMPLATES = [
    "Table for {g} on {d} at {t}, name {n}.",
    "Hi! Can I book for {g} people, {d} {t}? It's {n}.",
    "{n} here, party of {g}, {d} at {t} please.",
    "Reserve {d} {t} for {g}. Name: {n}",
    "Could we get a table at {t} this {d}? {g} of us, under {n}.",
    "Booking for {n}: {g} guests, {t}, {d}.",
    "I'd like a table for {g} at {t} on {d}. My name is {n}.",
    "{d} at {t}, {g} people, {n}.",
    "Please book {n} a table for {g}, {d}, {t}.",
    "Hello, this is {n}. We are {g}, coming {d} around {t}.",
    "Do you have space for {g} on {d}? About {t}. Thanks, {n}",
    "{g} people at {t} next {d}, booked under {n}, please.",
]


def guests_text(rng: random.Random, guests: int) -> str:
    return NUMBER_WORDS[guests] if rng.random() < 0.5 else str(guests)


def day_text(rng: random.Random, day: str) -> str:
    """A day as people type it: Friday, friday, Fri."""
    return rng.choice([day, day, day.lower(), day[:3]])


def time_text(rng: random.Random, hour: int, minute: int) -> str:
    """A time as people type it: 7pm, 7 pm, 7:30pm, 7.30 pm."""
    space = " " if rng.random() < 0.3 else ""
    if minute == 0 and rng.random() < 0.6:
        return f"{hour}{space}pm"
    return f"{hour}{rng.choice(':.')}{minute:02d}{space}pm"


def canonical_time(hour: int, minute: int) -> str:
    return f"{hour}:{minute:02d}pm"


def make_example(rng: random.Random, first_names: list[str], last_names: list[str]) -> dict:
    name = f"{rng.choice(first_names)} {rng.choice(last_names)}"
    guests = rng.randint(2, 12)
    day = rng.choice(DAYS)
    hour, minute = rng.choice(PM_HOURS), rng.choice(MINUTES)
    request = rng.choice(TEMPLATES).format(
        n=name, g=guests_text(rng, guests), d=day_text(rng, day), t=time_text(rng, hour, minute)
    )
    request = request[0].upper() + request[1:]  # "four people at ..." -> "Four people at ..."
    answer = {"name": name, "guests": guests, "day": day, "time": canonical_time(hour, minute)}
    return {
        "messages": [
            {"role": "user", "content": request},
            {"role": "assistant", "content": json.dumps(answer, separators=(",", ":"))},
        ]
    }


def make_split(rng: random.Random, n: int, first: list[str], last: list[str]) -> list[dict]:
    seen: set[str] = set()
    out = []
    while len(out) < n:
        ex = make_example(rng, first, last)
        request = ex["messages"][0]["content"]
        if request not in seen:  # no duplicate requests within a split either
            seen.add(request)
            out.append(ex)
    return out


def make_splits(seed: int = SEED) -> tuple[list[dict], list[dict]]:
    rng = random.Random(seed)
    k = N_TRAIN_NAMES
    train = make_split(rng, N_TRAIN, FIRST_NAMES[:k], LAST_NAMES[:k])
    heldout = make_split(rng, N_HELDOUT, FIRST_NAMES[k:], LAST_NAMES[k:])
    train_requests = {ex["messages"][0]["content"] for ex in train}
    assert not train_requests & {ex["messages"][0]["content"] for ex in heldout}
    assert not set(FIRST_NAMES[:k]) & set(FIRST_NAMES[k:])
    assert not set(LAST_NAMES[:k]) & set(LAST_NAMES[k:])
    return train, heldout


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def main() -> None:
    train, heldout = make_splits()
    write_jsonl(HERE / "train.jsonl", train)
    write_jsonl(HERE / "heldout.jsonl", heldout)
    print(f"wrote {len(train)} train and {len(heldout)} held-out examples to {HERE}")


if __name__ == "__main__":
    main()
