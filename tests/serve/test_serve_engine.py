"""The decode engine driven step by step (no HTTP): joining, leaving, sampling, failures."""

from __future__ import annotations

import shutil
import threading

from lorakit.lora.routing import BASE
from lorakit.serve import AdapterRegistry, Engine, GenerationRequest, SamplingParams, Update
from serve_helpers import load_tiny, reference_tokens


class Collector:
    """Records one request's updates."""

    def __init__(self) -> None:
        self.updates: list[Update] = []
        self.done = threading.Event()

    def __call__(self, update: Update) -> None:
        self.updates.append(update)
        if update.done:
            self.done.set()

    @property
    def text(self) -> str:
        return "".join(u.text for u in self.updates)

    @property
    def last(self) -> Update:
        return self.updates[-1]


def _engine(model_dir, adapters: dict, **kwargs) -> Engine:
    model, tokenizer = load_tiny(model_dir)
    registry = AdapterRegistry(model, "tiny", max_adapters=kwargs.pop("max_adapters", None))
    for name, path in adapters.items():
        registry.add(name, str(path))
    return Engine(model, tokenizer, registry, **kwargs)


def _submit(engine: Engine, ids: list[int], adapter: str = BASE, stream: bool = True, **params) -> Collector:
    collector = Collector()
    params = {"max_tokens": 8, "temperature": 0, **params}
    engine.submit(GenerationRequest(ids, SamplingParams(**params), collector, adapter=adapter, stream=stream))
    return collector


def _drain(engine: Engine, limit: int = 200) -> None:
    for _ in range(limit):
        engine.step()
        if not engine.busy:
            return
    raise AssertionError("engine still busy")


def _solo(model_dir, adapters, ids, adapter, **params) -> str:
    engine = _engine(model_dir, adapters)
    collector = _submit(engine, ids, adapter, **params)
    _drain(engine)
    return collector.text


def test_requests_join_and_leave_between_steps(serve_model_dir, adapter_dirs):
    """Requests arriving mid-flight join the running batch; each still gets exactly its solo tokens."""
    adapters = {n: adapter_dirs[n] for n in ("a0", "a1", "a2")}
    engine = _engine(serve_model_dir, adapters)
    first = [([5, 6, 7, 8], "a0", 10), ([9, 10], "a1", 3), ([11, 12, 13], BASE, 7)]
    later = [([14, 15, 16, 17, 18, 19], "a2", 6), ([20], "a0", 9)]
    collectors = [_submit(engine, ids, ad, max_tokens=n, ignore_eos=True) for ids, ad, n in first]
    engine.step()
    engine.step()
    assert engine.stats.peak_batch == 3
    collectors += [_submit(engine, ids, ad, max_tokens=n, ignore_eos=True) for ids, ad, n in later]
    _drain(engine)
    assert engine.stats.prefills == 2  # the late pair was prefilled together, between decode steps
    assert engine.stats.peak_batch >= 4
    for (ids, ad, n), collector in zip(first + later, collectors):
        assert collector.last.completion_tokens == n and collector.last.finish_reason == "length"
        assert collector.text == _solo(serve_model_dir, adapters, ids, ad, max_tokens=n, ignore_eos=True)
    tokenizer = engine.tokenizer
    expected = reference_tokens(serve_model_dir, adapter_dirs["a2"], later[0][0], 6)
    assert collectors[3].text == tokenizer.decode(expected, skip_special_tokens=True)


def test_a_request_that_does_not_stream_gets_one_update_with_all_the_text(serve_model_dir, adapter_dirs):
    adapters = {"a0": adapter_dirs["a0"]}
    engine = _engine(serve_model_dir, adapters)
    streamed = _submit(engine, [5, 6, 7], "a0", max_tokens=9, ignore_eos=True)
    whole = _submit(engine, [5, 6, 7], "a0", stream=False, max_tokens=9, ignore_eos=True)
    _drain(engine)
    assert len(streamed.updates) > 1 and len(whole.updates) == 1
    assert whole.text == streamed.text and whole.last.completion_tokens == 9 and whole.last.finish_reason == "length"


def test_seeded_sampling_does_not_depend_on_the_batch(serve_model_dir, adapter_dirs):
    adapters = {"a3": adapter_dirs["a3"]}
    wanted = dict(max_tokens=12, temperature=0.9, top_p=0.8, seed=1234, ignore_eos=True)
    alone = _solo(serve_model_dir, adapters, [7, 8, 9], "a3", **wanted)
    engine = _engine(serve_model_dir, adapters)
    others = [_submit(engine, [30 + i, 31], "a3" if i % 2 else BASE, max_tokens=5 + i, temperature=1.0, seed=i)
              for i in range(5)]
    target = _submit(engine, [7, 8, 9], "a3", **wanted)
    others.append(_submit(engine, [40, 41, 42], BASE, max_tokens=12))
    _drain(engine)
    assert target.text == alone
    assert _solo(serve_model_dir, adapters, [7, 8, 9], "a3", **{**wanted, "seed": 99}) != alone


def test_cancel_frees_the_slot_and_stops_updates(serve_model_dir):
    engine = _engine(serve_model_dir, {})
    keep = _submit(engine, [3, 4], max_tokens=6, ignore_eos=True)
    gone = _submit(engine, [5, 6], max_tokens=40, ignore_eos=True)
    engine.step()
    seen = len(gone.updates)
    engine.cancel(next(r.request.id for r in engine._running if r.request.on_update is gone))
    _drain(engine)
    assert len(gone.updates) == seen and not gone.done.is_set()
    assert keep.last.completion_tokens == 6
    assert engine.cache.capacity == 0  # idle: buffers released


def test_adapter_that_cannot_be_reloaded_fails_only_its_request(serve_model_dir, adapter_dirs, tmp_path):
    doomed = tmp_path / "doomed"
    shutil.copytree(adapter_dirs["a0"], doomed)
    engine = _engine(serve_model_dir, {"doomed": doomed, "a1": adapter_dirs["a1"]}, max_adapters=1)
    assert engine.registry.resident() == ["a1"]  # "doomed" was evicted to make room
    shutil.rmtree(doomed)
    bad = _submit(engine, [5, 6], "doomed")
    good = _submit(engine, [5, 6], "a1")
    _drain(engine)
    assert bad.last.error is not None and bad.last.error.status == 400
    assert "reloaded" in bad.last.error.message and str(doomed) in bad.last.error.message
    assert good.last.finish_reason in ("stop", "length") and good.last.error is None


def test_a_failing_forward_fails_the_batch_and_the_engine_keeps_serving(serve_model_dir, monkeypatch):
    engine = _engine(serve_model_dir, {})
    real_forward = engine.model.forward
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # the first decode step
            raise RuntimeError("simulated out of memory")
        return real_forward(*args, **kwargs)

    monkeypatch.setattr(engine.model, "forward", flaky)
    with engine:
        first = _submit(engine, [3, 4, 5], max_tokens=5)
        assert first.done.wait(30)
        assert first.last.error is not None and "simulated out of memory" in first.last.error.message
        second = _submit(engine, [3, 4, 5], max_tokens=5, ignore_eos=True)
        assert second.done.wait(30)
    assert second.last.error is None and second.last.completion_tokens == 5


def test_adapters_wait_for_room_when_all_resident_ones_are_busy(serve_model_dir, adapter_dirs):
    adapters = {n: adapter_dirs[n] for n in ("a0", "a1", "a2")}
    engine = _engine(serve_model_dir, adapters, max_adapters=2)
    long = [_submit(engine, [3, 4], ad, max_tokens=6, ignore_eos=True) for ad in ("a1", "a2")]
    engine.step()
    late = _submit(engine, [3, 4], "a0", max_tokens=2, ignore_eos=True)
    engine.step()
    assert not late.updates  # both resident adapters are busy: a0 waits instead of evicting one in use
    assert sorted(engine.registry.resident()) == ["a1", "a2"]
    _drain(engine)
    assert late.last.completion_tokens == 2 and all(c.last.completion_tokens == 6 for c in long)
    assert late.text == _solo(serve_model_dir, {"a0": adapter_dirs["a0"]}, [3, 4], "a0", max_tokens=2,
                              ignore_eos=True)


def test_eos_ends_a_request_and_is_counted(serve_model_dir):
    engine = _engine(serve_model_dir, {})
    probes = {i: _submit(engine, [i, i + 1, i + 2], max_tokens=8, ignore_eos=True) for i in range(6, 90, 7)}
    _drain(engine)
    for start, probe in probes.items():  # a prompt whose greedy reply has two different words
        tokens = engine.tokenizer(probe.text).input_ids  # word-level: one token per word, exactly
        cut = next((j for j in range(1, len(tokens)) if tokens[j] not in tokens[:j]), None)
        if cut is not None:
            break
    assert cut is not None
    prompt = [start, start + 1, start + 2]
    engine.eos_ids = {tokens[cut]}  # from now on this token ends the reply
    collector = _submit(engine, prompt, max_tokens=10)
    _drain(engine)
    assert collector.last.finish_reason == "stop" and collector.last.completion_tokens == cut + 1
    assert collector.text == engine.tokenizer.decode(tokens[:cut])
    forced = _submit(engine, prompt, max_tokens=4, ignore_eos=True)
    _drain(engine)
    assert forced.last.finish_reason == "length" and forced.last.completion_tokens == 4
