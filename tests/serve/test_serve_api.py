"""The server through the official `openai` client (and raw HTTP where a client cannot go)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from serve_helpers import BASE_NAME, chat_ids, make_tokenizer, reference_tokens, running_server

ADAPTERS = ("a0", "a1", "a2", "a3")


@pytest.fixture(scope="module")
def served(serve_model_dir, adapter_dirs):
    with running_server(serve_model_dir, {n: adapter_dirs[n] for n in ADAPTERS}) as s:
        yield s


def _prompt(i: int) -> str:
    return " ".join(f"w{(7 * i + 3 * k) % 94}" for k in range(3 + i % 6))


def test_models_lists_base_and_adapters(served):
    ids = [m.id for m in served.client().models.list().data]
    assert ids == [BASE_NAME, *ADAPTERS]
    assert served.client().models.retrieve("a1").parent == BASE_NAME


@pytest.mark.parametrize("model", [BASE_NAME, *ADAPTERS])
def test_chat_greedy_equals_library_generate(served, serve_model_dir, adapter_dirs, model):
    messages = [{"role": "user", "content": "w1 w2 w3 w4"}]
    reply = served.client().chat.completions.create(model=model, messages=messages, max_tokens=10, temperature=0)
    tokenizer = make_tokenizer()
    ids = chat_ids(tokenizer, messages)
    expected = reference_tokens(serve_model_dir, None if model == BASE_NAME else adapter_dirs[model], ids, 10)
    assert reply.choices[0].message.content == tokenizer.decode(expected, skip_special_tokens=True)
    assert reply.usage.prompt_tokens == len(ids)
    assert reply.usage.completion_tokens == len(expected)
    assert reply.usage.total_tokens == len(ids) + len(expected)
    eos_early = len(expected) < 10
    assert reply.choices[0].finish_reason == ("stop" if eos_early else "length")


def test_adapters_change_the_output(served):
    texts = {
        m: served.client().completions.create(model=m, prompt="w5 w6 w7", max_tokens=8, temperature=0).choices[0].text
        for m in (BASE_NAME, *ADAPTERS)
    }
    assert len(set(texts.values())) == len(texts)  # B is non-zero in every adapter: all differ


def test_streaming_reassembles_to_the_same_text(served):
    client = served.client()
    messages = [{"role": "system", "content": "w9"}, {"role": "user", "content": "w10 w11"}]
    whole = client.chat.completions.create(model="a2", messages=messages, max_tokens=12, temperature=0)
    chunks = list(client.chat.completions.create(
        model="a2", messages=messages, max_tokens=12, temperature=0, stream=True,
        stream_options={"include_usage": True},
    ))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1  # really streamed

    pieces = list(client.completions.create(model="a0", prompt="w1 w2", max_tokens=9, temperature=0, stream=True))
    whole_text = client.completions.create(model="a0", prompt="w1 w2", max_tokens=9, temperature=0).choices[0].text
    assert "".join(p.choices[0].text for p in pieces) == whole_text


def test_stop_strings_trim_and_finish(served):
    client = served.client()
    full = client.completions.create(model="a1", prompt="w3 w4", max_tokens=10, temperature=0).choices[0].text
    words = full.split()
    assert len(words) >= 4, "the reference run must produce a few words"
    stop = " " + words[2]  # cut before the third word
    cut = client.completions.create(model="a1", prompt="w3 w4", max_tokens=10, temperature=0, stop=[stop])
    assert cut.choices[0].text == full[: full.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model="a1", prompt="w3 w4", max_tokens=10, temperature=0, stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == cut.choices[0].text


def test_seeded_sampling_is_reproducible(served):
    client = served.client()

    def draw(seed: int) -> str:
        return client.completions.create(model="a3", prompt="w8 w9", max_tokens=12, temperature=1.0, top_p=0.9,
                                         seed=seed).choices[0].text

    assert draw(11) == draw(11)
    assert len({draw(s) for s in range(1, 6)}) > 1  # different seeds do sample differently


def test_concurrent_requests_across_adapters_match_solo_runs(served):
    """32 requests over 4 adapters (and base) at once: each equals the same request sent alone."""
    client = served.client()
    jobs = [(ADAPTERS[i % 4] if i % 8 else BASE_NAME, _prompt(i), 6 + i % 7) for i in range(32)]

    def ask(job):
        model, prompt, max_tokens = job
        return client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0).choices[0].text

    steps_before = served.engine.stats.decode_steps
    with ThreadPoolExecutor(32) as pool:
        together = list(pool.map(ask, jobs))
    steps_together = served.engine.stats.decode_steps - steps_before
    alone = [ask(job) for job in jobs]
    assert together == alone
    # they really were batched: far fewer decode steps than tokens generated
    assert steps_together < sum(j[2] for j in jobs) / 4


def test_load_and_unload_at_run_time(served, adapter_dirs):
    client = served.client()
    before = client.completions.create(model="a1", prompt="w1", max_tokens=6, temperature=0).choices[0].text
    response = httpx.post(served.url + "/v1/adapters", json={"name": "late", "path": str(adapter_dirs["a1"])})
    assert response.status_code == 200, response.text
    assert "late" in [m.id for m in client.models.list().data]
    late = client.completions.create(model="late", prompt="w1", max_tokens=6, temperature=0).choices[0].text
    assert late == before  # same weights as a1, loaded under another name

    response = httpx.delete(served.url + "/v1/adapters/late")
    assert response.status_code == 200 and response.json()["deleted"] is True
    assert "late" not in [m.id for m in client.models.list().data]
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="late", prompt="w1", max_tokens=6)
    assert httpx.delete(served.url + "/v1/adapters/late").status_code == 404


def test_least_recently_used_adapter_is_evicted_and_reloaded(serve_model_dir, adapter_dirs):
    with running_server(serve_model_dir, {n: adapter_dirs[n] for n in ADAPTERS}, max_adapters=2) as s:
        client = s.client()
        assert s.registry.resident() == ["a2", "a3"]  # loading a0..a3 kept the last two
        first = client.completions.create(model="a0", prompt="w4 w5", max_tokens=6, temperature=0).choices[0].text
        assert s.registry.resident() == ["a3", "a0"]  # a2 was the least recently used
        client.completions.create(model="a1", prompt="w4", max_tokens=2, temperature=0)
        assert s.registry.resident() == ["a0", "a1"]
        loads = s.registry.loads
        again = client.completions.create(model="a0", prompt="w4 w5", max_tokens=6, temperature=0).choices[0].text
        assert again == first and s.registry.loads == loads  # still resident: no reload
        client.completions.create(model="a2", prompt="w4", max_tokens=2, temperature=0)
        client.completions.create(model="a3", prompt="w4", max_tokens=2, temperature=0)
        reloaded = client.completions.create(model="a0", prompt="w4 w5", max_tokens=6, temperature=0).choices[0].text
        assert reloaded == first and s.registry.loads == loads + 3


# -- errors: each an OpenAI error body, and the server keeps serving ------------------------------
def _error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"] and error["type"]
    return error


def test_bad_json_and_missing_fields_are_400(served):
    url = served.url + "/v1/chat/completions"
    error = _error(httpx.post(url, content=b'{"model": "tiny", "messages": [', headers={"content-type": "application/json"}), 400)
    assert "JSON" in error["message"]
    error = _error(httpx.post(url, json={"model": "tiny"}), 400)
    assert error["param"] == "messages" and "missing" in error["message"]
    error = _error(httpx.post(served.url + "/v1/completions", json={"prompt": "w1"}), 400)
    assert error["param"] == "model"
    error = _error(httpx.post(url, json={"model": "tiny", "messages": [{"role": "user", "content": "w1"}],
                                         "temperature": 7}), 400)
    assert error["param"] == "temperature"
    _error(httpx.post(url, json={"model": "tiny", "messages": []}), 400)
    _error(httpx.post(url, json=["not", "an", "object"]), 400)
    with pytest.raises(openai.BadRequestError):
        served.client().completions.create(model="tiny", prompt="w1", n=2)


def test_unknown_model_is_404(served):
    with pytest.raises(openai.NotFoundError) as info:
        served.client().chat.completions.create(model="nope", messages=[{"role": "user", "content": "w1"}])
    assert "nope" in info.value.body["message"]
    with pytest.raises(openai.NotFoundError):
        served.client().models.retrieve("nope")


def test_prompt_or_max_tokens_beyond_the_context_is_400(served):
    client = served.client()
    context = served.engine.context_len
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="a0", prompt=" ".join(["w1"] * (context + 5)), max_tokens=1)
    assert "context" in info.value.body["message"]
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="a0", prompt="w1 w2", max_tokens=context)
    assert info.value.body["param"] == "max_tokens"
    # the default max_tokens fits what room is left, and finishes by length at the context's end
    long_prompt = " ".join(["w2"] * (context - 3))
    reply = client.completions.create(model="tiny", prompt=long_prompt, temperature=0)
    assert reply.usage.completion_tokens <= 3


def test_bad_adapter_loads_are_400_and_change_nothing(served, adapter_dirs, tmp_path):
    url = served.url + "/v1/adapters"
    before = [m.id for m in served.client().models.list().data]
    error = _error(httpx.post(url, json={"name": "ghost", "path": str(tmp_path / "nowhere")}), 400)
    assert "nowhere" in error["message"]
    error = _error(httpx.post(url, json={"name": "misfit", "path": str(adapter_dirs["misfit"])}), 400)
    assert "shape" in error["message"]
    empty = tmp_path / "empty"
    empty.mkdir()
    _error(httpx.post(url, json={"name": "empty", "path": str(empty)}), 400)
    _error(httpx.post(url, json={"name": "a0", "path": str(adapter_dirs["a0"])}), 400)  # name taken
    _error(httpx.post(url, json={"name": "bad/name", "path": str(adapter_dirs["a0"])}), 400)
    _error(httpx.post(url, json={"path": str(adapter_dirs["a0"])}), 400)
    assert [m.id for m in served.client().models.list().data] == before
    reply = served.client().completions.create(model="a0", prompt="w1", max_tokens=3, temperature=0)
    assert reply.usage.completion_tokens >= 1  # still serving


def test_api_key_is_required_when_set(serve_model_dir, adapter_dirs):
    with running_server(serve_model_dir, {"a0": adapter_dirs["a0"]}, api_key="sesame") as s:
        assert [m.id for m in s.client().models.list().data] == [BASE_NAME, "a0"]
        with pytest.raises(openai.AuthenticationError):
            s.client(api_key="wrong").models.list()
        with pytest.raises(openai.AuthenticationError):
            s.client(api_key="wrong").chat.completions.create(model="a0", messages=[{"role": "user", "content": "w1"}])
        _error(httpx.get(s.url + "/v1/models"), 401)  # no header at all
        _error(httpx.post(s.url + "/v1/adapters", json={"name": "x", "path": "/tmp"}), 401)
        assert httpx.get(s.url + "/health").status_code == 200
        reply = s.client().completions.create(model="a0", prompt="w1", max_tokens=2, temperature=0)
        assert reply.choices[0].text is not None


def test_binds_to_loopback_by_default():
    import inspect

    from lorakit.serve.server import DEFAULT_HOST, run_server, serving

    assert DEFAULT_HOST == "127.0.0.1"
    assert inspect.signature(run_server).parameters["host"].default == "127.0.0.1"
    assert inspect.signature(serving).parameters["host"].default == "127.0.0.1"
