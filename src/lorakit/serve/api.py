"""The HTTP API: OpenAI's /v1/models, /v1/chat/completions and /v1/completions, plus adapter loading.

Handlers only validate, tokenise and wait: each HTTP call becomes one or more
`GenerationRequest`s for the engine thread, whose updates come back on an asyncio queue.
Every failure is answered with OpenAI's error body, and the server keeps serving.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from collections.abc import AsyncIterator, Sequence
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from lorakit.lora.routing import BASE

from . import protocol as P
from .engine import Engine, GenerationRequest, Update
from .errors import BadRequest, NotFound, ServeError, Unauthorized
from .sampling import SamplingParams

log = logging.getLogger("lorakit.serve")

DEFAULT_MAX_TOKENS = 256


def create_app(
    engine: Engine, model_name: str, *, api_key: str | None = None, default_max_tokens: int = DEFAULT_MAX_TOKENS
) -> FastAPI:
    """The FastAPI app serving `engine`'s model as `model_name` and each registered adapter by its name.

    The engine must be started (and later closed) by the caller.
    """
    app = FastAPI(title="lorakit", description="OpenAI-compatible server for a base model and its LoRA adapters")
    created = P.now()
    tokenizer = engine.tokenizer
    registry = engine.registry
    _add_error_handlers(app)

    def check_key(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            raise Unauthorized("Missing API key: send the header 'Authorization: Bearer YOUR_KEY'")
        if not hmac.compare_digest(given.strip().encode(), api_key.encode()):
            raise Unauthorized("Incorrect API key provided")

    def adapter_for(model: str) -> str:
        if model == model_name:
            return BASE
        if registry is not None and model in registry:
            return model
        raise NotFound(f"The model {model!r} does not exist; available: {', '.join(model_names())}", param="model")

    def model_names() -> list[str]:
        return [model_name, *(registry.names() if registry is not None else [])]

    def card(name: str) -> dict[str, Any]:
        if name == model_name:
            return P.model_card(name, created)
        return P.model_card(name, created, parent=model_name, root=registry.path(name))

    def params_for(body: P._Generation, prompt_ids: Sequence[list[int]], prompt_param: str) -> list[SamplingParams]:
        context = engine.context_len
        limit = body.token_limit()
        out = []
        for ids in prompt_ids:
            if not ids:
                raise BadRequest("the prompt is empty", param=prompt_param)
            room = context - len(ids)
            if room < 1:
                raise BadRequest(
                    f"the prompt is {len(ids)} tokens, but the model's context holds {context} "
                    "(and at least one more token is needed for the reply)", param=prompt_param,
                )
            if limit is not None and limit > room:
                raise BadRequest(
                    f"max_tokens={limit} is too large: the prompt is {len(ids)} tokens and the context holds "
                    f"{context}, so at most {room} tokens can be generated", param="max_tokens",
                )
            out.append(SamplingParams(
                max_tokens=limit if limit is not None else min(default_max_tokens, room),
                temperature=1.0 if body.temperature is None else body.temperature,
                top_p=1.0 if body.top_p is None else body.top_p,
                seed=body.seed,
                stop=body.stop_strings(),
                ignore_eos=body.ignore_eos,
            ))
        return out

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models", dependencies=[Depends(check_key)])
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [card(n) for n in model_names()]}

    @app.get("/v1/models/{name:path}", dependencies=[Depends(check_key)])
    async def get_model(name: str) -> dict[str, Any]:
        adapter_for(name)
        return card(name)

    @app.post("/v1/chat/completions", dependencies=[Depends(check_key)])
    async def chat_completions(body: P.ChatCompletionRequest) -> Any:
        body.refuse_unsupported()
        adapter = adapter_for(body.model)
        ids = chat_prompt_ids(tokenizer, [m.as_template_input() for m in body.messages])
        job = _Job(engine, [ids], params_for(body, [ids], "messages"), adapter, bool(body.stream))
        rid = P.new_id("chatcmpl")
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return await _stream(job, _chat_chunks(job, rid, body.model, include_usage))
        texts, finishes, use = await job.collect()
        return P.chat_response(rid, body.model, texts[0], finishes[0], use)

    @app.post("/v1/completions", dependencies=[Depends(check_key)])
    async def completions(body: P.CompletionRequest) -> Any:
        body.refuse_unsupported()
        adapter = adapter_for(body.model)
        prompts = body.prompts()
        ids = [tokenizer(p).input_ids for p in prompts]
        job = _Job(engine, ids, params_for(body, ids, "prompt"), adapter, bool(body.stream))
        rid = P.new_id("cmpl")
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return await _stream(job, _completion_chunks(job, rid, body.model, include_usage))
        texts, finishes, use = await job.collect()
        return P.completion_response(rid, body.model, texts, finishes, use)

    @app.post("/v1/adapters", dependencies=[Depends(check_key)])
    async def load_adapter(body: P.AdapterLoad) -> dict[str, Any]:
        if registry is None:
            raise BadRequest("this server was started without adapter support")
        await asyncio.wrap_future(engine.call(lambda: registry.add(body.name, body.path)))
        return card(body.name)

    @app.delete("/v1/adapters/{name:path}", dependencies=[Depends(check_key)])
    async def unload_adapter(name: str) -> dict[str, Any]:
        if registry is None or name not in registry:
            raise NotFound(f"adapter {name!r} is not loaded", param="name")
        await asyncio.wrap_future(engine.call(lambda: registry.remove(name)))
        return {"id": name, "object": "model", "deleted": True}

    return app


def chat_prompt_ids(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of a conversation in the tokenizer's chat template, ready for the assistant's reply."""
    if not getattr(tokenizer, "chat_template", None):
        raise BadRequest("this model's tokenizer has no chat template; use /v1/completions", param="messages")
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as err:  # templates raise their own errors, e.g. on an unexpected role order
        raise BadRequest(f"the chat template rejected the messages: {err}", param="messages") from None
    return tokenizer(text, add_special_tokens=False).input_ids


# -- one HTTP call's requests ---------------------------------------------------------------------
class _Job:
    """The engine requests made for one HTTP call; their updates arrive on one asyncio queue."""

    def __init__(
        self, engine: Engine, prompt_ids: list[list[int]], params: list[SamplingParams], adapter: str, stream: bool
    ) -> None:
        loop = asyncio.get_running_loop()
        self.engine = engine
        self.queue: asyncio.Queue[tuple[int, Update]] = asyncio.Queue()

        def listener(index: int):
            return lambda update: loop.call_soon_threadsafe(self.queue.put_nowait, (index, update))

        self.requests = [
            GenerationRequest(list(ids), p, listener(i), adapter=adapter, stream=stream)
            for i, (ids, p) in enumerate(zip(prompt_ids, params))
        ]
        self.open = set(range(len(self.requests)))
        self.prompt_tokens = sum(len(ids) for ids in prompt_ids)
        self.completion_tokens = [0] * len(self.requests)
        for request in self.requests:
            engine.submit(request)

    async def next(self) -> tuple[int, Update]:
        """The next update; raises the request's error (after cancelling the others)."""
        index, update = await self.queue.get()
        if update.error is not None:
            self.cancel()
            raise update.error
        self.completion_tokens[index] = update.completion_tokens
        if update.done:
            self.open.discard(index)
        return index, update

    def cancel(self) -> None:
        for index in list(self.open):
            self.engine.cancel(self.requests[index].id)
        self.open.clear()

    def usage(self) -> dict[str, int]:
        return P.usage(self.prompt_tokens, sum(self.completion_tokens))

    async def collect(self) -> tuple[list[str], list[str], dict[str, int]]:
        texts = [""] * len(self.requests)
        finishes = [""] * len(self.requests)
        try:
            while self.open:
                index, update = await self.next()
                texts[index] += update.text
                if update.done:
                    finishes[index] = update.finish_reason
        finally:
            self.cancel()  # the client went away (or one request failed): stop the rest
        return texts, finishes, self.usage()


# -- streaming (server-sent events) ---------------------------------------------------------------
async def _stream(job: _Job, chunks: AsyncIterator[str]) -> Any:
    """Wait for the first chunk, so a failure before any text still gets a proper HTTP error."""
    try:
        first = await chunks.__anext__()
    except ServeError:
        job.cancel()
        raise

    async def events() -> AsyncIterator[str]:
        try:
            yield first
            async for chunk in chunks:
                yield chunk
        except ServeError as err:  # the response has started: report in-band, as OpenAI does
            yield _sse(err.body())
        finally:
            job.cancel()
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


async def _chat_chunks(job: _Job, rid: str, model: str, include_usage: bool) -> AsyncIterator[str]:
    index, update = await job.next()  # before the role chunk: an early error stays an HTTP error
    yield _sse(_with_usage(P.chat_chunk(rid, model, {"role": "assistant", "content": ""}), include_usage))
    while True:
        if update.text:
            yield _sse(_with_usage(P.chat_chunk(rid, model, {"content": update.text}), include_usage))
        if update.done:
            yield _sse(_with_usage(P.chat_chunk(rid, model, {}, update.finish_reason), include_usage))
            break
        index, update = await job.next()
    if include_usage:
        yield _sse(P.usage_chunk(rid, model, "chat.completion.chunk", job.usage()))


async def _completion_chunks(job: _Job, rid: str, model: str, include_usage: bool) -> AsyncIterator[str]:
    while job.open:
        index, update = await job.next()
        if update.text or update.done:
            chunk = P.completion_chunk(rid, model, index, update.text, update.finish_reason)
            yield _sse(_with_usage(chunk, include_usage))
    if include_usage:
        yield _sse(P.usage_chunk(rid, model, "text_completion", job.usage()))


def _with_usage(chunk: dict[str, Any], include_usage: bool) -> dict[str, Any]:
    return {**chunk, "usage": None} if include_usage else chunk


# -- errors ---------------------------------------------------------------------------------------
def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServeError)
    async def serve_error(_: Request, err: ServeError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(_: Request, err: RequestValidationError) -> JSONResponse:
        return JSONResponse(_validation_error(err.errors()).body(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, err: StarletteHTTPException) -> JSONResponse:
        error = ServeError(str(err.detail))
        error.type = "invalid_request_error" if err.status_code < 500 else "server_error"
        return JSONResponse(error.body(), status_code=err.status_code, headers=getattr(err, "headers", None))

    @app.exception_handler(Exception)
    async def unexpected(_: Request, err: Exception) -> JSONResponse:
        log.exception("unexpected error")
        return JSONResponse(ServeError(f"internal error: {type(err).__name__}: {err}").body(), status_code=500)


def _validation_error(errors: Sequence[dict[str, Any]]) -> BadRequest:
    """One 400 naming the first bad field (or saying the body is not JSON)."""
    if not errors:
        return BadRequest("invalid request body")
    first = errors[0]
    if first.get("type") == "json_invalid":
        detail = (first.get("ctx") or {}).get("error", "")
        return BadRequest(f"the request body is not valid JSON{': ' + str(detail) if detail else ''}")
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    field = ".".join(loc)
    if first.get("type") == "missing":
        return BadRequest(f"missing required field {field!r}", param=field or None)
    message = first.get("msg", "invalid value")
    return BadRequest(f"{field}: {message}" if field else message, param=field or None)


__all__ = ["create_app", "chat_prompt_ids", "DEFAULT_MAX_TOKENS"]
