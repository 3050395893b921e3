"""Records -> token ids with loss labels, truncated to a maximum length.

Labels are -100 (ignored by the loss) everywhere except the assistant/completion
tokens, found by mapping each token's character offsets onto the rendered spans.
Working from offsets of the full text, rather than tokenising pieces separately,
keeps the token ids exactly what the model sees at inference.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from lorakit.data.errors import DataError
from lorakit.data.formats import Record, resolve_format
from lorakit.data.render import Rendered, Span, render

IGNORE = -100


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # same length; IGNORE where no loss
    position_ids: list[int] | None = None  # packed rows only: restarts at 0 per example


@dataclass
class TokenizedData:
    examples: list[Example]
    n_records: int
    n_truncated: int  # kept examples cut to max_seq_len
    n_dropped: int  # records with no trainable token left (after truncation)
    n_tokens: int  # in kept examples
    n_trainable: int  # tokens with a label


def tokenize_records(
    records: Sequence[Record],
    tokenizer: Any,
    max_seq_len: int,
    train_on_prompt: bool = False,
    fmt: str = "auto",
) -> TokenizedData:
    """Tokenise every record; drop those left with nothing to learn.

    Raises DataError naming the record if one is malformed, and if nothing is left.
    """
    if max_seq_len < 2:
        raise ValueError(f"max_seq_len must be at least 2, got {max_seq_len}")
    examples, n_truncated, n_dropped = [], 0, 0
    for index, record in enumerate(records):
        try:
            rendered = render(record, resolve_format(record, fmt), tokenizer, train_on_prompt)
        except DataError as err:
            raise DataError(f"record {index}: {err}") from None
        input_ids, labels = encode(rendered, tokenizer)
        truncated = len(input_ids) > max_seq_len
        input_ids, labels = input_ids[:max_seq_len], labels[:max_seq_len]
        if all(label == IGNORE for label in labels):
            n_dropped += 1
            continue
        n_truncated += truncated
        examples.append(Example(input_ids, labels))
    if not examples:
        raise DataError(
            f"no training examples left: all {len(records)} records were dropped for having "
            f"no trainable tokens within max_seq_len={max_seq_len}"
            if records else "no training records given"
        )
    return TokenizedData(
        examples, len(records), n_truncated, n_dropped,
        n_tokens=sum(len(e.input_ids) for e in examples),
        n_trainable=sum(label != IGNORE for e in examples for label in e.labels),
    )


def encode(rendered: Rendered, tokenizer: Any) -> tuple[list[int], list[int]]:
    """Token ids and labels for rendered text; the first token is never a target."""
    try:
        encoding = tokenizer(
            rendered.text,
            add_special_tokens=rendered.add_special_tokens,
            return_offsets_mapping=True,
        )
    except NotImplementedError as err:
        raise TypeError("lorakit.data needs a fast tokenizer (one with offset mappings)") from err
    input_ids = list(encoding["input_ids"])
    trained = _overlaps(encoding["offset_mapping"], rendered.spans)
    eos = getattr(tokenizer, "eos_token_id", None)
    if rendered.append_eos and eos is not None and (not input_ids or input_ids[-1] != eos):
        input_ids.append(eos)
        trained.append(bool(rendered.spans))
    labels = [tok if keep else IGNORE for tok, keep in zip(input_ids, trained)]
    if labels:
        labels[0] = IGNORE  # nothing precedes it, so no position predicts it
    return input_ids, labels


def _overlaps(offsets: Sequence[tuple[int, int]], spans: list[Span]) -> list[bool]:
    """For each token, whether its characters overlap a span (both sorted, one pass).

    Overlap, not containment: a token that merges the prompt's last space with the
    completion's first word still carries completion text, so it is trained on.
    Tokens with no characters (added specials, offsets (0, 0)) never are.
    """
    spans = sorted(span for span in spans if span[1] > span[0])
    result, j = [], 0
    for start, end in offsets:
        while j < len(spans) and spans[j][1] <= start:
            j += 1
        result.append(end > start and j < len(spans) and spans[j][0] < end)
    return result
