"""Rendering a record to text, with the character spans the loss should cover.

Chats go through the tokenizer's own chat template. To find each assistant turn we
render the conversation prefix by prefix: the turn's text is what
``messages[:i+1]`` adds to ``messages[:i]`` plus the generation prompt. This works
for any template that renders a conversation as a growing prefix, with no need for
``{% generation %}`` markers (which most templates lack), and a template that does
not is reported instead of silently mis-masked.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lorakit.data.errors import DataError
from lorakit.data.formats import Message, Record, as_chat, as_plain

Span = tuple[int, int]  # [start, end) in characters of the rendered text


@dataclass(frozen=True)
class Rendered:
    text: str
    spans: list[Span]  # the loss covers tokens overlapping these
    add_special_tokens: bool  # plain text gets the tokenizer's BOS; templates write their own
    append_eos: bool  # plain text ends with EOS so the model learns to stop


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render(record: Record, fmt: str, tokenizer: Any, train_on_prompt: bool = False) -> Rendered:
    """``record`` (already known to be ``fmt``) as text plus its trainable spans."""
    messages = as_chat(record, fmt)
    if messages is not None and has_chat_template(tokenizer):
        if train_on_prompt:  # no turns to locate, so any template will do
            text = _apply(tokenizer, messages, generation_prompt=False)
            return Rendered(text, [(0, len(text))], False, False)
        text, spans = render_chat(messages, tokenizer)
        return Rendered(text, spans, False, False)
    prompt, completion = as_plain(record, fmt)
    start = 0 if train_on_prompt else len(prompt)
    return Rendered(prompt + completion, [(start, len(prompt) + len(completion))], True, True)


def render_chat(messages: list[Message], tokenizer: Any) -> tuple[str, list[Span]]:
    """The whole conversation, and the span of every assistant turn in it."""
    full = _apply(tokenizer, messages, generation_prompt=False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        if i == 0:  # templates cannot render the empty prefix it would follow
            raise DataError("message 0 is an assistant reply to nothing; start with a user turn")
        before = _apply(tokenizer, messages[:i], generation_prompt=True)
        upto = full if i == len(messages) - 1 else _apply(tokenizer, messages[: i + 1], False)
        if not (full.startswith(upto) and upto.startswith(before)):
            raise DataError(
                f"the chat template does not render message {i} (assistant) as a growing "
                "prefix of the conversation, so its tokens cannot be located; "
                "use train_on_prompt=True or split the conversation"
            )
        spans.append((len(before), len(upto)))
    return full, spans


def _apply(tokenizer: Any, messages: list[Message], generation_prompt: bool) -> str:
    try:
        text = tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt
        )
    except Exception as err:  # jinja raises its own errors for templates' rules (role order, …)
        raise DataError(f"the chat template rejected the conversation: {err}") from err
    return text
