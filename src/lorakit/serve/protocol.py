"""The OpenAI wire format: request bodies (validated) and the JSON the server answers with.

Fields the OpenAI API has but this server does not use (e.g. `user`, `presence_penalty`) are
accepted and ignored, so clients written for OpenAI work unchanged; fields whose meaning the
server cannot honour (`n` > 1, `logprobs`, tools) are refused with a 400 naming the field.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field

from .errors import BadRequest


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="allow")


class StreamOptions(_Lenient):
    include_usage: bool = False


class _Generation(_Lenient):
    """What chat and text completions share."""

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stop: Union[str, list[str], None] = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int | None = None
    logprobs: Any = None
    ignore_eos: bool = False  # vLLM's extension: generate max_tokens tokens whatever comes

    def refuse_unsupported(self) -> None:
        if self.n not in (None, 1):
            raise BadRequest("n must be 1: this server returns one choice per prompt", param="n")
        if self.logprobs not in (None, False, 0):
            raise BadRequest("logprobs are not supported by this server", param="logprobs")
        extra = self.model_extra or {}
        for name in ("tools", "functions", "response_format"):
            if extra.get(name):
                raise BadRequest(f"{name} is not supported by this server", param=name)

    def stop_strings(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if any(not s for s in stops):
            raise BadRequest("stop strings must not be empty", param="stop")
        return tuple(stops)


class TextPart(_Lenient):
    type: str
    text: str | None = None


class ChatMessage(_Lenient):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[TextPart], None] = None

    def as_template_input(self) -> dict[str, str]:
        """{role, content} with content as plain text (text parts joined; `developer` read as system)."""
        if isinstance(self.content, list):
            if any(part.type != "text" or part.text is None for part in self.content):
                raise BadRequest("only text content parts are supported", param="messages")
            content = "".join(part.text for part in self.content)
        else:
            content = self.content or ""
        return {"role": "system" if self.role == "developer" else self.role, "content": content}


class ChatCompletionRequest(_Generation):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)

    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(_Generation):
    prompt: Union[str, list[str]]
    echo: bool = False

    def prompts(self) -> list[str]:
        prompts = [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)
        if not prompts:
            raise BadRequest("prompt must not be an empty list", param="prompt")
        if self.echo:
            raise BadRequest("echo is not supported by this server", param="echo")
        return prompts

    def token_limit(self) -> int | None:
        return self.max_tokens


class AdapterLoad(_Lenient):
    name: str
    path: str


# -- responses ----------------------------------------------------------------------------------
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def model_card(name: str, created: int, parent: str | None = None, root: str | None = None) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": created, "owned_by": "lorakit", "parent": parent,
            "root": root or name}


def chat_response(rid: str, model: str, text: str, finish: str, use: dict[str, int]) -> dict[str, Any]:
    choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None, "finish_reason": finish}
    return {"id": rid, "object": "chat.completion", "created": now(), "model": model,
            "system_fingerprint": None, "choices": [choice], "usage": use}


def chat_chunk(rid: str, model: str, delta: dict[str, str], finish: str | None = None) -> dict[str, Any]:
    choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
    return {"id": rid, "object": "chat.completion.chunk", "created": now(), "model": model,
            "system_fingerprint": None, "choices": [choice]}


def completion_response(
    rid: str, model: str, texts: list[str], finishes: list[str], use: dict[str, int]
) -> dict[str, Any]:
    choices = [{"index": i, "text": t, "logprobs": None, "finish_reason": f} for i, (t, f) in enumerate(zip(texts, finishes))]
    return {"id": rid, "object": "text_completion", "created": now(), "model": model,
            "system_fingerprint": None, "choices": choices, "usage": use}


def completion_chunk(rid: str, model: str, index: int, text: str, finish: str | None = None) -> dict[str, Any]:
    choice = {"index": index, "text": text, "logprobs": None, "finish_reason": finish}
    return {"id": rid, "object": "text_completion", "created": now(), "model": model,
            "system_fingerprint": None, "choices": [choice]}


def usage_chunk(rid: str, model: str, obj: str, use: dict[str, int]) -> dict[str, Any]:
    """The last chunk of a stream with `stream_options.include_usage`: no choices, the usage."""
    return {"id": rid, "object": obj, "created": now(), "model": model, "system_fingerprint": None,
            "choices": [], "usage": use}
