"""The task behind ``make demo``: turn a booking request into one line of JSON.

The user types a restaurant booking in free text ("Table for four on Friday at
7:30pm, name Alice Moreno."); the assistant must answer with nothing but

    {"name":"Alice Moreno","guests":4,"day":"Friday","time":"7:30pm"}

The base SmolLM2-135M-Instruct chats back instead, so it scores ~0 %. Besides the
format, the fine-tune has to learn small normalisations: number words become
integers ("four" -> 4), days are spelled out ("fri" -> "Friday") and times get one
spelling ("7 pm", "7.30pm" -> "7:00pm", "7:30pm"). The held-out split
(``examples/demo/heldout.jsonl``, written by ``examples/demo/make_data.py``) uses
names that never occur in training, so its score measures generalisation.

The metric is strict exact match on the parsed object: the whole reply must be one
JSON object with exactly the reference's keys, values and value types. Key order and
whitespace are free, anything else (prose around it, "4" for 4) is wrong.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

# The reply's token budget when scoring (greedy decoding); an answer is ~25 tokens. The training
# recipe is examples/demo/recipe.yaml, in `lorakit train`'s keys.
MAX_NEW_TOKENS = 40


def _canonical(text: str) -> str | None:
    """The JSON object in ``text`` written one fixed way, or None if it is not one."""
    try:
        obj = json.loads(text.strip())
    except ValueError:
        return None
    if not isinstance(obj, dict):
        return None
    # dumps keeps types apart (4 vs 4.0 vs "4" vs true) where == would not
    return json.dumps(obj, sort_keys=True)


def score(prediction: str, reference: str) -> bool:
    """True when the reply is exactly the reference object (up to key order and spacing)."""
    expected = _canonical(reference)
    if expected is None:
        raise ValueError(f"reference is not a JSON object: {reference!r}")
    return _canonical(prediction) == expected


def accuracy(predictions: Iterable[str], references: Iterable[str]) -> float:
    """Fraction of predictions that score; the number ``make demo`` prints."""
    hits = [score(p, r) for p, r in zip(predictions, references, strict=True)]
    return sum(hits) / len(hits) if hits else 0.0
