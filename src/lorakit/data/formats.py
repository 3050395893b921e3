"""Record formats: which shape a record has, and what it says as a conversation.

Every format is reduced to one of two things: a chat (a list of ``{role, content}``
messages) or a prompt/completion pair of strings. The tokenizer decides later how
those are rendered; this module only knows about records.
"""

from __future__ import annotations

from typing import Any

from lorakit.data.errors import DataError

FORMATS = ("messages", "alpaca", "prompt_completion", "text")

Record = dict[str, Any]
Message = dict[str, str]

# Required string fields per format; detection tries them in this order, so a record
# carrying several shapes' keys is read as the most structured one.
_REQUIRED: dict[str, tuple[str, ...]] = {
    "prompt_completion": ("prompt", "completion"),
    "alpaca": ("instruction", "output"),
    "text": ("text",),
}


def detect_format(record: Record) -> str:
    """The format a record is in, or DataError naming the keys it has."""
    if not isinstance(record, dict):
        raise DataError(f"record is a {type(record).__name__}, expected a JSON object")
    if "messages" in record:
        return "messages"
    for fmt, keys in _REQUIRED.items():
        if all(key in record for key in keys):
            return fmt
    raise DataError(
        f"record fits no format (keys: {', '.join(map(str, record)) or 'none'}); expected "
        "'messages', 'prompt'+'completion', 'instruction'+'output' (+'input'), or 'text'"
    )


def resolve_format(record: Record, fmt: str = "auto") -> str:
    """The format to read ``record`` as (``fmt`` unless "auto"), checked against it."""
    if fmt == "auto":
        fmt = detect_format(record)
    elif fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; expected 'auto' or one of {FORMATS}")
    if not isinstance(record, dict):
        raise DataError(f"record is a {type(record).__name__}, expected a JSON object")
    if fmt == "messages":
        _check_messages(record.get("messages"))
        return fmt
    for key in _REQUIRED[fmt]:
        if not isinstance(record.get(key), str):
            found = "missing" if key not in record else f"a {type(record[key]).__name__}"
            raise DataError(
                f"format {fmt!r} needs string field {key!r}, but it is {found} "
                f"(keys: {', '.join(map(str, record))})"
            )
    if fmt == "alpaca" and not isinstance(record.get("input") or "", str):
        raise DataError("format 'alpaca' needs 'input' to be a string when present")
    return fmt


def _check_messages(messages: Any) -> None:
    if not isinstance(messages, list) or not messages:
        raise DataError("'messages' must be a non-empty list of {role, content} objects")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise DataError(f"message {i} is a {type(message).__name__}, expected an object")
        for key in ("role", "content"):
            if not isinstance(message.get(key), str):
                problem = "has no" if key not in message else "has a non-string"
                raise DataError(f"message {i} {problem} {key!r} (keys: {', '.join(message)})")


def as_chat(record: Record, fmt: str) -> list[Message] | None:
    """The record as chat messages; None for plain ``text`` (nothing to chat about)."""
    if fmt == "messages":
        return [{"role": m["role"], "content": m["content"]} for m in record["messages"]]
    if fmt == "text":
        return None
    prompt, completion = _pair(record, fmt)
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]


def as_plain(record: Record, fmt: str) -> tuple[str, str]:
    """The record as (prompt, completion) strings for tokenizers without a chat template.

    ``text`` is all completion; alpaca gets a blank line before its answer so the
    instruction and the output do not run together.
    """
    if fmt == "messages":
        raise DataError("chat 'messages' need a tokenizer with a chat template")
    if fmt == "text":
        return "", record["text"]
    prompt, completion = _pair(record, fmt)
    return (prompt + "\n\n", completion) if fmt == "alpaca" else (prompt, completion)


def _pair(record: Record, fmt: str) -> tuple[str, str]:
    if fmt == "alpaca":
        extra = record.get("input") or ""
        prompt = record["instruction"] + (f"\n\n{extra}" if extra else "")
        return prompt, record["output"]
    return record["prompt"], record["completion"]
