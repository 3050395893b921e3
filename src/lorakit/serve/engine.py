"""The decode engine: continuous batching of requests for different adapters over one model.

One background thread does every forward pass (the model is not safe for concurrent forwards).
Each turn of its loop:

1. takes in new work (requests, cancellations, adapter loads) from a thread-safe inbox;
2. admits waiting requests into free batch slots and prefills their prompts together, one
   forward for all of them, each prompt written into its own slot of the KV cache;
3. runs one decode step for every running request: one token each, one forward, where batch
   row i uses request i's adapter (a per-row `routing.Route`) and attends to its own slot;
4. hands each request its new text, and retires finished requests, freeing their slots.

So requests join and leave the running batch between decode steps, and a request's tokens
do not depend on what it shares the batch with (up to float rounding; see docs/serve.md).
"""

from __future__ import annotations

import inspect
import logging
import queue
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from lorakit.lora.routing import BASE, Route, route

from .detokenize import TextStream
from .errors import ServeError
from .kvcache import SlotKVCache
from .registry import AdapterRegistry
from .sampling import SamplingParams, greedy_tokens, sample_token

log = logging.getLogger("lorakit.serve")


@dataclass(frozen=True)
class Update:
    """What the engine tells a request's owner: new text, and at the end why it stopped."""

    text: str = ""
    finish_reason: str | None = None  # "stop" (eos or a stop string) or "length"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: ServeError | None = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None or self.error is not None


@dataclass
class GenerationRequest:
    """One prompt to complete. `on_update` is called on the engine thread: it must return quickly."""

    prompt_ids: list[int]
    params: SamplingParams
    on_update: Callable[[Update], None]
    adapter: str = BASE
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    stream: bool = True  # False: one update at the end with all the text (less cross-thread traffic)


@dataclass
class _Row:
    """A running request: its slot is its index in `Engine._running`."""

    request: GenerationRequest
    text: TextStream
    generator: torch.Generator | None
    position: int  # tokens already in the KV cache
    last_token: int = -1  # sampled, not yet fed to the model
    generated: int = 0
    held: str = ""  # text not yet sent (requests that do not stream)


@dataclass
class EngineStats:
    prefills: int = 0
    prefill_tokens: int = 0
    decode_steps: int = 0
    decode_tokens: int = 0
    decode_seconds: float = 0.0
    prefill_seconds: float = 0.0
    peak_batch: int = 0  # most requests decoded together


class Engine:
    """Serves `GenerationRequest`s on `model` (a transformers causal LM; adapters via `registry`)."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        registry: AdapterRegistry | None = None,
        *,
        max_batch_size: int = 32,
        max_prefill_tokens: int = 4096,
        context_len: int | None = None,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.registry = registry
        self.max_batch_size = max_batch_size
        self.max_prefill_tokens = max_prefill_tokens
        self.context_len = context_len or model_context_len(model, tokenizer)
        self.eos_ids = eos_token_ids(model, tokenizer)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(self.eos_ids, default=0)
        self.device = next(model.parameters()).device
        self.cache = SlotKVCache(max_batch_size, self.context_len)
        self._cache_kwarg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        self.stats = EngineStats()
        self._inbox: queue.SimpleQueue[tuple] = queue.SimpleQueue()
        self._waiting: deque[GenerationRequest] = deque()
        self._running: list[_Row] = []
        self._cancelled: set[str] = set()
        self._thread: threading.Thread | None = None
        self._looping = False  # run() is serving in some thread
        self._route: Route | None = None  # the last batch's adapters; dropped when `call` changes the model

    # -- life ----------------------------------------------------------------------------------
    def start(self) -> "Engine":
        """Serve in a thread of the engine's own."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="lorakit-engine", daemon=True)
            self._thread.start()
        return self

    def run(self) -> None:
        """Serve in the calling thread until `close()` is called from another one.

        On a CPU, prefer this from the thread that has run torch so far (the main thread):
        OpenMP keeps one worker pool per calling thread, and a second pool on the same cores
        makes every parallel region wait (measured: decode steps 1.6x slower on 2 cores).
        """
        if self._thread is not None:
            raise RuntimeError("the engine already runs in its own thread")
        self._looping = True
        try:
            self._loop()
        finally:
            self._looping = False

    def close(self, timeout: float = 30.0) -> None:
        """Stop serving; requests still in flight get an error update."""
        if self._thread is not None:
            self._inbox.put(("stop",))
            self._thread.join(timeout)
            self._thread = None
        elif self._looping:
            self._inbox.put(("stop",))

    def __enter__(self) -> "Engine":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- from any thread -----------------------------------------------------------------------
    def submit(self, request: GenerationRequest) -> None:
        self._inbox.put(("submit", request))

    def cancel(self, request_id: str) -> None:
        """Drop a request (its client went away); it gets no further updates."""
        self._inbox.put(("cancel", request_id))

    def call(self, fn: Callable[[], Any]) -> Future:
        """Run `fn` on the engine thread between forward passes (adapter loads change the model)."""
        future: Future = Future()
        self._inbox.put(("call", fn, future))
        return future

    @property
    def busy(self) -> bool:
        return bool(self._waiting or self._running)

    # -- the loop ------------------------------------------------------------------------------
    def _loop(self) -> None:
        while self._take_inbox(block=not self.busy):
            try:
                self._turn()
            except Exception as err:  # a bug or out of memory: fail what is in flight, keep serving
                log.exception("engine step failed")
                self._fail_running(ServeError(f"generation failed: {type(err).__name__}: {err}"))
        self._fail_running(ServeError("the server is shutting down"))
        for request in self._waiting:
            _notify(request, Update(error=ServeError("the server is shutting down")))

    def _take_inbox(self, block: bool) -> bool:
        """Apply queued commands; False once asked to stop."""
        while True:
            try:  # a blocking wait wakes now and then, so Ctrl-C reaches a main thread that serves
                item = self._inbox.get(block=block, timeout=0.5 if block else None)
            except queue.Empty:
                return True
            block = False
            kind = item[0]
            if kind == "stop":
                return False
            if kind == "submit":
                self._waiting.append(item[1])
            elif kind == "cancel":
                self._cancel(item[1])
            elif kind == "call":
                fn, future = item[1], item[2]
                self._route = None
                if future.set_running_or_notify_cancel():
                    try:
                        future.set_result(fn())
                    except BaseException as err:  # handed to the caller, not raised here
                        future.set_exception(err)

    def step(self) -> None:
        """Drive the engine without its thread: apply what was submitted, then one turn."""
        self._take_inbox(block=False)
        self._turn()

    def _turn(self) -> None:
        """Admit and prefill waiting requests, then one decode step for all running ones.

        Only this runs in inference mode: adapters loaded between turns (`call`) must be
        ordinary tensors, which the LoRA layers' caches can track.
        """
        with torch.inference_mode():
            new = self._admit()
            if new:
                self._prefill(new)
            if self._running:
                self._decode()

    # -- scheduling ----------------------------------------------------------------------------
    def _admit(self) -> list[GenerationRequest]:
        """Waiting requests that fit in free slots, the prefill budget and adapter memory, in order."""
        batch: list[GenerationRequest] = []
        deferred: deque[GenerationRequest] = deque()
        longest = 0
        while self._waiting and len(self._running) + len(batch) < self.max_batch_size:
            request = self._waiting.popleft()
            length = len(request.prompt_ids)
            if batch and max(longest, length) * (len(batch) + 1) > self.max_prefill_tokens:
                self._waiting.appendleft(request)
                break
            if request.adapter != BASE:
                try:
                    ready = self._acquire(request.adapter)
                except ServeError as err:
                    _notify(request, Update(error=err))
                    continue
                except Exception as err:  # e.g. out of memory while reloading: this request fails alone
                    log.exception("loading adapter %r failed", request.adapter)
                    _notify(request, Update(error=ServeError(f"loading adapter {request.adapter!r} failed: {err}")))
                    continue
                if not ready:  # every resident adapter is busy: wait for one to finish
                    deferred.append(request)
                    continue
            batch.append(request)
            longest = max(longest, length)
        self._waiting.extendleft(reversed(deferred))
        return batch

    def _acquire(self, adapter: str) -> bool:
        if self.registry is None:
            raise ServeError(f"adapter {adapter!r} requested but the engine has no adapter registry")
        with torch.inference_mode(False):  # a reload makes weights; they must be ordinary tensors
            return self.registry.acquire(adapter)

    def _release(self, request: GenerationRequest) -> None:
        if request.adapter != BASE and self.registry is not None:
            self.registry.release(request.adapter)

    def _cancel(self, request_id: str) -> None:
        self._waiting = deque(r for r in self._waiting if r.id != request_id)
        for row in self._running:
            if row.request.id == request_id:
                self._cancelled.add(request_id)

    # -- forward passes ------------------------------------------------------------------------
    def _forward(self, ids: Tensor, mask: Tensor, positions: Tensor, adapters: Sequence[str], **kwargs) -> Tensor:
        """Logits of the last kept position per row, shape (rows, vocab)."""
        rows = tuple(adapters)
        if self._route is None or self._route.rows != rows:  # the same Route while the batch is the same:
            self._route = Route(rows=rows)  # the layers then keep their per-batch plans between steps
        with route(self._route):
            out = self.model(
                input_ids=ids.to(self.device),
                attention_mask=mask.to(self.device),
                position_ids=positions.to(self.device),
                use_cache=True,
                **{self._cache_kwarg: self.cache},
                **kwargs,
            )
        logits = out.logits[:, -1]
        return logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16 -> fp32; fp64 stays

    def _prefill(self, batch: list[GenerationRequest]) -> None:
        """Write each new prompt into its own slot (one forward for all) and sample its first token."""
        started = time.perf_counter()
        lengths = torch.tensor([len(r.prompt_ids) for r in batch])
        width = int(lengths.max())
        ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        for i, request in enumerate(batch):
            ids[i, : len(request.prompt_ids)] = torch.tensor(request.prompt_ids)
        keys = torch.arange(width)
        causal = keys[None, :] <= keys[:, None]  # (query, key)
        mask = causal[None] & (keys[None, None, :] < lengths[:, None, None])  # (rows, query, key)
        positions = keys.expand(len(batch), width)
        self.cache.plan_prefill(len(self._running), len(batch), width)
        try:
            logits = self._forward(
                ids, mask[:, None], positions, [r.adapter for r in batch],
                logits_to_keep=(lengths - 1)[:, None].to(self.device),
            )
        except Exception as err:  # only the new requests fail: the running ones' slots are untouched
            log.exception("prefill failed")
            for request in batch:
                self._release(request)
                _notify(request, Update(error=ServeError(f"generation failed: {type(err).__name__}: {err}")))
            return
        rows = [
            _Row(r, TextStream(self.tokenizer, r.params.stop), r.params.generator(), position=len(r.prompt_ids))
            for r in batch
        ]
        self._running.extend(rows)
        self.stats.prefills += 1
        self.stats.prefill_tokens += int(lengths.sum())
        self.stats.prefill_seconds += time.perf_counter() - started
        self._advance(rows, logits)

    def _decode(self) -> None:
        """Feed every running request its last token; sample the next one."""
        started = time.perf_counter()
        rows = self._running
        ids = torch.tensor([[row.last_token] for row in rows])
        positions = torch.tensor([row.position for row in rows])
        length = int(positions.max()) + 1
        mask = torch.arange(length)[None, :] <= positions[:, None]  # (rows, key): own filled positions
        self.cache.plan_decode(positions.to(self.device))
        logits = self._forward(ids, mask[:, None, None], positions[:, None], [row.request.adapter for row in rows])
        for row in rows:
            row.position += 1
        self.stats.decode_steps += 1
        self.stats.decode_tokens += len(rows)
        self.stats.peak_batch = max(self.stats.peak_batch, len(rows))
        self.stats.decode_seconds += time.perf_counter() - started
        self._advance(rows, logits)

    # -- tokens out ----------------------------------------------------------------------------
    def _advance(self, rows: list[_Row], logits: Tensor) -> None:
        """Sample one token per row, tell each request, then retire the finished ones."""
        greedy = [i for i, row in enumerate(rows) if row.request.params.greedy]
        if len(greedy) == len(rows):
            tokens = greedy_tokens(logits)
        else:
            tokens = [0] * len(rows)
            if greedy:
                for i, token in zip(greedy, greedy_tokens(logits[greedy])):
                    tokens[i] = token
            for i, row in enumerate(rows):
                if not row.request.params.greedy:
                    tokens[i] = sample_token(logits[i], row.request.params, row.generator)
        finished: list[_Row] = []
        for row, token in zip(rows, tokens):
            if row.request.id in self._cancelled:
                finished.append(row)
                continue
            row.last_token, row.generated = token, row.generated + 1
            reason = None
            if token in self.eos_ids and not row.request.params.ignore_eos:
                reason, piece = "stop", row.text.finish()
            else:
                piece = row.text.push(token)
                if row.text.stopped:
                    reason = "stop"
                elif row.generated >= row.request.params.max_tokens:
                    reason, piece = "length", piece + row.text.finish()
            if not row.request.stream and not reason:
                row.held += piece
            elif piece or reason:
                _notify(row.request, self._update(row, row.held + piece, reason))
            if reason:
                finished.append(row)
        self._retire(finished)

    def _update(self, row: _Row, text: str, reason: str | None) -> Update:
        return Update(text, reason, len(row.request.prompt_ids), row.generated)

    def _retire(self, finished: list[_Row]) -> None:
        """Free the slots of finished rows, moving the last rows into the holes."""
        if not finished:
            return
        done = {id(row) for row in finished}
        for index in sorted((i for i, row in enumerate(self._running) if id(row) in done), reverse=True):
            row = self._running[index]
            last = len(self._running) - 1
            if index != last:
                self.cache.move(last, index, self._running[last].position)
                self._running[index] = self._running[last]
            self._running.pop()
            self._cancelled.discard(row.request.id)
            self._release(row.request)
        if not self._running and not self._waiting:
            self.cache.reset()

    def _fail_running(self, error: ServeError) -> None:
        for row in self._running:
            self._release(row.request)
            if row.request.id not in self._cancelled:
                _notify(row.request, Update(error=error))
        self._running, self._cancelled = [], set()
        self.cache.reset()


def _notify(request: GenerationRequest, update: Update) -> None:
    try:
        request.on_update(update)
    except Exception:  # a broken listener must not stop the engine
        log.exception("on_update of request %s failed", request.id)


def eos_token_ids(model: nn.Module, tokenizer: Any) -> set[int]:
    """Tokens that end a reply: the generation config's eos ids plus the tokenizer's eos."""
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), getattr(model, "config", None)):
        value = getattr(source, "eos_token_id", None)
        if value is not None:
            ids.update([value] if isinstance(value, int) else value)
            break
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def model_context_len(model: nn.Module, tokenizer: Any) -> int:
    """Positions the model can attend over: its config's limit, else the tokenizer's."""
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if limit is None:
        limit = getattr(tokenizer, "model_max_length", None)
    if not limit or limit > 10**7:
        raise ValueError("cannot tell the model's context length; pass context_len")
    return int(limit)
