"""The HTTP server (hetero_rt.serve) on a real uvicorn over loopback, driven by the real `openai`
client and raw HTTP: greedy replies equal Runtime.generate run directly (streamed and not, chat and
text, OpenAI and Ollama shapes), usage counts, stop strings, limits; every bad request is a 4xx with
a message in the API's error shape and the next request works; the API key; /health and /metrics
counters; a client hanging up mid-stream frees its slot; and a bounded soak (>= 1,000 requests from
8 client threads, a fifth of them hanging up) after which every slot is free and threads and RSS
are back where they were after a warm-up batch."""
import json
import re
import threading
import time

import openai
import psutil
import pytest
import uvicorn

import hetero_rt
from hetero_rt.serve import build_app, default_model_name
from hetero_rt.serve.app import STATIC

try:
    import httpx
except ImportError:          # httpx's successor under its own name (what some openai releases use)
    import httpx2 as httpx

MODEL = "tiny-test"
HELLO = [{"role": "user", "content": "Hello there, how are you?"}]


# ---------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from hetero_rt.checkpoint.synthetic import synthetic_config, write_synthetic_checkpoint
    return write_synthetic_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt", synthetic_config("tiny"),
                                      seed=0, dtype="float32")


@pytest.fixture(scope="module")
def rt(ckpt):
    return hetero_rt.load(ckpt, dtype="float32", parallel=4)


class Server:
    """A uvicorn server of build_app(rt, ...) on a free loopback port, in a background thread."""

    def __init__(self, rt, api_key=None):
        self.rt = rt
        config = uvicorn.Config(build_app(rt, MODEL, api_key), host="127.0.0.1", port=0, log_level="warning",
                                access_log=False, timeout_graceful_shutdown=5)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="test-uvicorn", daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.01)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(30)
        assert not self.thread.is_alive()

    def openai(self, key="x"):
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0, timeout=60)

    def http(self, timeout=60):
        return httpx.Client(base_url=self.url, timeout=timeout)


@pytest.fixture(scope="module")
def server(rt):
    with Server(rt) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return server.openai()


@pytest.fixture(scope="module")
def http(server):
    with server.http() as c:
        yield c


def drain(rt, timeout_s=60):
    """Wait until the batcher holds no request, and its last step (which updates the counters after
    the replies were sent) is complete."""
    deadline = time.monotonic() + timeout_s
    while True:
        with rt.batcher.lock:
            if not rt.batcher.active and not rt.batcher.waiting:
                return
        assert time.monotonic() < deadline, "the batcher did not drain"
        time.sleep(0.01)


def metrics(http):
    r = http.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    out = {}
    for line in r.text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def ascii_stop(text, start=3):
    """A 2-character stop string of letters or digits first occurring at or after `start`."""
    for i in range(start, len(text) - 1):
        s = text[i:i + 2]
        if re.fullmatch(r"[A-Za-z0-9]{2}", s) and text.find(s) == i:
            return s
    pytest.fail(f"no usable stop string in {text!r}")


def assert_openai_error(r, status=400, param=None, *needles):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and isinstance(err["message"], str), err
    assert err["type"] == ("invalid_request_error" if status < 500 else "server_error")
    if param is not None:
        assert err["param"] == param, err
    for n in needles:
        assert n in err["message"], err["message"]
    return err


# ---------------------------------------------------------------- OpenAI API

def test_chat_greedy_streamed_equals_whole_equals_generate(rt, client):
    want = rt.generate(HELLO, max_new_tokens=12, temperature=0)
    assert want.stop_reason == "length" and len(want.new_ids) == 12     # the tiny model says no EOS this soon
    r = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=12, temperature=0)
    assert r.object == "chat.completion" and r.model == MODEL and len(r.choices) == 1
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == want.text
    assert r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == len(rt.encode(HELLO)) and r.usage.completion_tokens == 12
    assert r.usage.total_tokens == r.usage.prompt_tokens + 12
    assert 0 <= r.usage.prompt_tokens_details.cached_tokens < r.usage.prompt_tokens

    chunks = list(client.chat.completions.create(model=MODEL, messages=HELLO, max_completion_tokens=12,
                                                 temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == want.text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    usage = chunks[-1]
    assert usage.choices == [] and usage.usage.completion_tokens == 12
    assert usage.usage.prompt_tokens == len(rt.encode(HELLO))
    assert all(c.usage is None for c in chunks[:-1])


def test_stream_without_usage_ends_with_done(server, rt):
    want = rt.generate(HELLO, max_new_tokens=5, temperature=0)
    with server.http() as h, h.stream("POST", "/v1/chat/completions",
                                      json={"messages": HELLO, "max_tokens": 5, "temperature": 0,
                                            "stream": True}) as s:
        assert s.status_code == 200 and s.headers["content-type"].startswith("text/event-stream")
        events = [line for line in s.iter_lines() if line]
    assert events[-1] == "data: [DONE]" and all(e.startswith("data: ") for e in events)
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    assert all("usage" not in c for c in chunks)
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == want.text
    assert chunks[-1]["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "length"}


def test_stop_string_and_length(rt, client):
    full = rt.generate(HELLO, max_new_tokens=16, temperature=0).text
    stop = ascii_stop(full)
    before = full[:full.index(stop)]
    r = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=16, temperature=0, stop=stop)
    assert r.choices[0].message.content == before and r.choices[0].finish_reason == "stop"
    chunks = list(client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=16, temperature=0,
                                                 stop=[stop, "\x00never"], stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == before
    assert chunks[-1].choices[0].finish_reason == "stop"
    r = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=3, temperature=0)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 3


def test_seeded_sampling_is_reproducible(client):
    kw = dict(model=MODEL, messages=HELLO, max_tokens=8, temperature=0.9, top_p=0.95, seed=1234)
    a = client.chat.completions.create(**kw).choices[0].message.content
    b = client.chat.completions.create(**kw, extra_body={"top_k": 50}).choices[0].message.content
    c = client.chat.completions.create(**kw, extra_body={"top_k": 50}).choices[0].message.content
    assert a == client.chat.completions.create(**kw).choices[0].message.content and b == c


def test_without_max_tokens_the_reply_may_fill_the_context(rt, client):
    """No limit: the budget is the context's rest after the prompt (the reply ends at EOS or there)."""
    long = [{"role": "user", "content": "tell me a long story " * 20}]
    n = len(rt.encode(long))
    r = client.chat.completions.create(model=MODEL, messages=long, temperature=0)
    assert r.usage.prompt_tokens == n and 1 <= r.usage.completion_tokens <= rt.context - n
    if r.choices[0].finish_reason == "length":
        assert r.usage.completion_tokens == rt.context - n
    big = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=10 ** 6, temperature=0,
                                         stop="\x00")
    assert big.usage.prompt_tokens + big.usage.completion_tokens <= rt.context     # clamped, not refused


def test_text_completions(rt, client):
    prompt = "Once upon a time"
    want = rt.generate(prompt, max_new_tokens=10, temperature=0)
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=10, temperature=0)
    assert r.object == "text_completion" and r.choices[0].text == want.text and r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == len(rt.encode(prompt)) and r.usage.completion_tokens == 10
    chunks = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=10, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert all(c.object == "text_completion" for c in chunks)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 10

    ids = [0, 17, 250, 9, 33]
    want = rt.generate(ids, max_new_tokens=6, temperature=0)
    r = client.completions.create(model=MODEL, prompt=ids, max_tokens=6, temperature=0)
    assert r.choices[0].text == want.text and r.usage.prompt_tokens == len(ids)
    r = client.completions.create(model=MODEL, prompt=[ids], max_tokens=6, temperature=0)
    assert r.choices[0].text == want.text


def test_models(client, http):
    assert [m.id for m in client.models.list()] == [MODEL]
    assert http.get(f"/v1/models/{MODEL}").json()["id"] == MODEL


# ---------------------------------------------------------------- Ollama API

def ndjson(r):
    assert r.headers["content-type"].startswith("application/x-ndjson")
    return [json.loads(line) for line in r.iter_lines() if line]


def test_ollama_chat(rt, http):
    want = rt.generate(HELLO, max_new_tokens=8, temperature=0)
    body = {"model": MODEL, "messages": HELLO, "options": {"temperature": 0, "num_predict": 8}}
    with http.stream("POST", "/api/chat", json=body) as s:        # streams by default, as Ollama does
        assert s.status_code == 200
        lines = ndjson(s)
    assert all(not x["done"] for x in lines[:-1]) and lines[-1]["done"]
    assert "".join(x["message"]["content"] for x in lines) == want.text
    last = lines[-1]
    assert last["done_reason"] == "length" and last["eval_count"] == 8
    assert last["prompt_eval_count"] == len(rt.encode(HELLO)) and last["model"] == MODEL
    assert all(isinstance(last[k], int) and last[k] >= 0 for k in
               ("total_duration", "prompt_eval_duration", "eval_duration", "load_duration"))
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z", last["created_at"])

    r = http.post("/api/chat", json={**body, "stream": False})
    one = r.json()
    assert r.status_code == 200 and one["done"] and one["message"] == {"role": "assistant", "content": want.text}
    assert one["done_reason"] == "length" and one["eval_count"] == 8

    stop = ascii_stop(want.text)
    one = http.post("/api/chat", json={**body, "stream": False,
                                       "options": {"temperature": 0, "num_predict": 8, "stop": [stop]}}).json()
    assert one["message"]["content"] == want.text[:want.text.index(stop)] and one["done_reason"] == "stop"


def test_ollama_generate(rt, http):
    prompt = "Why is the sky blue?"
    templated = rt.generate([{"role": "user", "content": prompt}], max_new_tokens=6, temperature=0)
    raw = rt.generate(prompt, max_new_tokens=6, temperature=0)
    body = {"model": MODEL, "prompt": prompt, "options": {"temperature": 0, "num_predict": 6}}
    with http.stream("POST", "/api/generate", json=body) as s:
        lines = ndjson(s)
    assert "".join(x["response"] for x in lines) == templated.text and lines[-1]["done_reason"] == "length"
    one = http.post("/api/generate", json={**body, "stream": False}).json()
    assert one["response"] == templated.text and one["eval_count"] == 6
    assert one["prompt_eval_count"] == len(rt.encode([{"role": "user", "content": prompt}]))
    one = http.post("/api/generate", json={**body, "stream": False, "raw": True}).json()
    assert one["response"] == raw.text and one["prompt_eval_count"] == len(rt.encode(prompt))
    system = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": prompt}]
    one = http.post("/api/generate", json={**body, "stream": False, "system": "Be brief."}).json()
    assert one["response"] == rt.generate(system, max_new_tokens=6, temperature=0).text
    load = http.post("/api/generate", json={"model": MODEL}).json()            # preload: no generation
    assert load["done"] and load["done_reason"] == "load" and load["response"] == ""


def test_ollama_listing(http, ckpt):
    tags = http.get("/api/tags").json()["models"]
    assert [m["name"] for m in tags] == [MODEL] and tags[0]["size"] > 0
    assert re.fullmatch(r"[0-9a-f]{64}", tags[0]["digest"]) and tags[0]["details"]["format"] == "safetensors"
    show = http.post("/api/show", json={"model": MODEL}).json()
    assert show["model_info"]["general.architecture"] and "{{" in show["template"]
    assert http.get("/api/version").json()["version"] == hetero_rt.__version__
    assert http.get("/api/ps").json()["models"][0]["name"] == MODEL


def test_default_model_name(rt):
    assert default_model_name(rt) == "ckpt"


# ---------------------------------------------------------------- errors

def test_bad_requests_are_400_in_the_openai_shape_and_the_server_goes_on(rt, server, http, client):
    url = "/v1/chat/completions"
    ok = {"messages": HELLO, "max_tokens": 2, "temperature": 0}

    def works():
        r = http.post(url, json=ok)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2

    cases = [
        (b'{"messages": [', None, "not valid JSON"),
        (b"", None, "empty"),
        (b"[1, 2]", None, "JSON object"),
        (json.dumps({**ok, "max_tokens": "ten"}), "max_tokens", "integer"),
        (json.dumps({**ok, "max_tokens": 10.5}), "max_tokens", "integer"),
        (json.dumps({**ok, "stream": "yes"}), "stream", "boolean"),
        (json.dumps({**ok, "temperature": "hot"}), "temperature", "number"),
        (json.dumps({"messages": "hello"}), "messages", "list"),
        (json.dumps({"max_tokens": 3}), "messages", "required"),
        (json.dumps({"messages": [{"role": "wizard", "content": "hi"}]}), "messages[0].role", "'user'"),
        (json.dumps({"messages": [42]}), "messages[0]", "dictionary"),
        (json.dumps({"messages": []}), "messages", "empty"),
        (json.dumps({**ok, "max_tokens": 0}), "max_tokens", "at least 1"),
        (json.dumps({**ok, "max_completion_tokens": -3}), "max_completion_tokens", "at least 1"),
        (json.dumps({**ok, "temperature": -1}), "temperature", "temperature"),
        (json.dumps({**ok, "top_p": 0}), "top_p", "top_p"),
        (json.dumps({**ok, "top_k": -1}), "top_k", "top_k"),
        (json.dumps({**ok, "stop": 5}), "stop", "stop"),
        (json.dumps({**ok, "n": 2}), "n", "n must be 1"),
        (json.dumps({**ok, "logprobs": True}), "logprobs", "not supported"),
        (json.dumps({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}), None, "only text"),
    ]
    for body, param, needle in cases:
        r = http.post(url, content=body, headers={"content-type": "application/json"})
        assert_openai_error(r, 400, param, needle)
        works()

    long = [{"role": "user", "content": "many words " * 400}]
    n = len(rt.encode(long))
    assert n > rt.context
    err = assert_openai_error(http.post(url, json={"messages": long}), 400, "messages", str(n), str(rt.context))
    assert err["code"] == "context_length_exceeded"
    r = http.post("/v1/completions", json={"prompt": list(range(1, rt.context + 5)), "max_tokens": 1})
    assert_openai_error(r, 400, "prompt", str(rt.context + 4), str(rt.context))
    assert_openai_error(http.post("/v1/completions", json={"prompt": [0, 10 ** 6]}), 400, None, "vocabulary")
    assert_openai_error(http.post("/v1/completions", json={"prompt": {"a": 1}}), 400, "prompt", "string")
    assert_openai_error(http.post("/v1/completions", json={"prompt": ["a", "b"]}), 400, "prompt", "one prompt")
    assert_openai_error(http.post("/v1/completions", json={"prompt": "a", "echo": True}), 400, "echo")
    works()

    with pytest.raises(openai.BadRequestError, match="max_tokens"):     # the client sees its usual error
        client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=0)
    assert_openai_error(http.get("/v1/nope"), 404, None, "/v1/nope")
    assert_openai_error(http.get(url), 405)
    works()
    drain(rt)
    assert rt.batcher.busy_slots == 0


def test_a_failing_forward_is_a_500_and_the_server_goes_on(rt, http, monkeypatch):
    forward = rt.batcher.forward

    def broken(*a, **kw):
        raise RuntimeError("boom in the forward")

    body = {"messages": HELLO, "max_tokens": 3, "temperature": 0}
    monkeypatch.setattr(rt.batcher, "forward", broken)
    assert_openai_error(http.post("/v1/chat/completions", json=body), 500, None, "boom in the forward")
    with http.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as s:
        events = [line for line in s.iter_lines() if line]
    assert events[-1] == "data: [DONE]" and "boom in the forward" in json.loads(events[-2][6:])["error"]["message"]
    r = http.post("/api/chat", json={"messages": HELLO, "stream": False})
    assert r.status_code == 500 and "boom" in r.json()["error"]
    monkeypatch.setattr(rt.batcher, "forward", forward)
    monkeypatch.setattr(rt, "encode", lambda *a, **kw: 1 / 0)                 # a bug in a route
    assert_openai_error(http.post("/v1/chat/completions", json=body), 500, None, "ZeroDivisionError")
    monkeypatch.undo()
    assert http.post("/v1/chat/completions", json=body).json()["usage"]["completion_tokens"] == 3
    drain(rt)
    assert rt.batcher.busy_slots == 0


def test_ollama_errors_use_its_shape(http):
    bad = [{"messages": HELLO, "options": {"temperature": "hot"}},
           {"messages": HELLO, "options": {"num_predict": 0}},
           {"messages": [{"role": "wizard", "content": "x"}]},
           {"messages": HELLO, "format": "json"},
           {"messages": [{"role": "user", "content": "many words " * 400}]}]
    needles = ["options.temperature", "num_predict", "messages[0].role", "format", "context holds"]
    for body, needle in zip(bad, needles):
        r = http.post("/api/chat", json=body)
        assert r.status_code == 400 and isinstance(r.json()["error"], str) and needle in r.json()["error"], r.text
    r = http.post("/api/generate", content=b"{nope")
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]
    one = http.post("/api/chat", json={"messages": HELLO, "stream": False, "options": {"num_predict": 1}}).json()
    assert one["done"] and one["eval_count"] == 1


def test_api_key(ckpt):
    rt = hetero_rt.load(ckpt, dtype="float32", parallel=2)
    with Server(rt, api_key="sekrit") as s, s.http() as h:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sekrit"}):
            assert_openai_error(h.get("/v1/models", headers=headers), 401, None, "Authorization: Bearer")
            r = h.post("/api/chat", json={"messages": HELLO}, headers=headers)
            assert r.status_code == 401 and "API key" in r.json()["error"]
        with pytest.raises(openai.AuthenticationError):
            s.openai("wrong").models.list()
        good = s.openai("sekrit")
        assert good.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2).usage.completion_tokens == 2
        r = h.get("/api/tags", headers={"Authorization": "Bearer sekrit"})
        assert r.status_code == 200
        assert h.get("/health").json()["status"] == "ok" and h.get("/metrics").status_code == 200
    assert rt.batcher.busy_slots == 0


# ---------------------------------------------------------------- health, metrics, page

def test_health_and_metrics_count_what_was_sent(rt, http, client):
    health = http.get("/health").json()
    assert health["status"] == "ok" and health["slots_total"] == 4 and health["slots_busy"] == 0
    drain(rt)
    before = metrics(http)
    prompts = [[{"role": "user", "content": f"count {i} " * (i + 1)}] for i in range(3)]
    replies = [client.chat.completions.create(model=MODEL, messages=p, max_tokens=2, temperature=0) for p in prompts]
    drain(rt)
    after = metrics(http)
    delta = {k: after[k] - before.get(k, 0) for k in after}
    assert delta["hetero_rt_requests_total"] == 3
    assert delta["hetero_rt_prompt_tokens_total"] == sum(len(rt.encode(p)) for p in prompts)
    assert delta["hetero_rt_prompt_tokens_cached_total"] == sum(r.usage.prompt_tokens_details.cached_tokens
                                                                for r in replies)
    assert delta["hetero_rt_generated_tokens_total"] == 6
    assert delta['hetero_rt_requests_finished_total{reason="length"}'] == 3
    assert after["hetero_rt_slots_busy"] == 0 and after["hetero_rt_queue_depth"] == 0
    assert after["hetero_rt_slots_total"] == 4
    assert after["hetero_rt_prefill_tokens_per_second"] > 0 and after["hetero_rt_decode_tokens_per_second"] > 0
    assert not any(k.startswith("hetero_rt_expert_cache") for k in after)     # no cache placed here


def test_index_page(http):
    r = http.get("/")
    page = STATIC / "index.html"
    if page.is_file():
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    else:
        assert r.status_code == 404 and "index.html" in r.text


# ---------------------------------------------------------------- disconnects and the soak

def test_hanging_up_mid_stream_cancels_the_request(rt, server, http):
    """Each request (OpenAI and Ollama streams, a whole reply the client stops waiting for) is held
    after its first few forwards (they wait on an event, not a clock) until the client has hung up: it
    must then end as cancelled within one more token, with its slot free."""
    drain(rt)
    before = metrics(http)
    forward, calls, hung_up = rt.batcher.forward, [0], threading.Event()

    def held(*a, **kw):
        calls[0] += 1
        if calls[0] > 3:
            hung_up.wait(60)
        return forward(*a, **kw)

    rt.batcher.forward = held
    try:
        for path, body in [("/v1/chat/completions", {"messages": HELLO, "stream": True, "temperature": 0}),
                           ("/api/chat", {"messages": HELLO, "options": {"temperature": 0}})]:
            calls[0] = 0
            hung_up.clear()
            with server.http() as h, h.stream("POST", path, json=body) as s:
                lines = (line for line in s.iter_lines() if line)
                next(lines), next(lines)        # OpenAI: the role chunk, then a first piece: generation is on
            hung_up.set()
            drain(rt)
        calls[0] = 0
        hung_up.clear()
        with server.http(timeout=0.5) as h, pytest.raises(httpx.ReadTimeout):   # not streamed: the client
            h.post("/v1/chat/completions", json={"messages": HELLO, "temperature": 0})    # gives up waiting
        hung_up.set()
        drain(rt)
    finally:
        rt.batcher.forward = forward
        hung_up.set()
    after = metrics(http)
    assert after['hetero_rt_requests_finished_total{reason="cancelled"}'] - before.get(
        'hetero_rt_requests_finished_total{reason="cancelled"}', 0) == 3
    # per request: at most the 3 free forwards' tokens, the held one, and one more before the cancel is seen
    assert after["hetero_rt_generated_tokens_total"] - before["hetero_rt_generated_tokens_total"] <= 3 * 5
    assert rt.batcher.busy_slots == 0


def soak_prompts(rt, n=40, new_tokens=3):
    prompts = [[{"role": "user", "content": f"request {i}: {'tell me about ' * (i % 7)}item {i * 37 % 101}"}]
               for i in range(n)]
    want = [rt.generate(p, max_new_tokens=new_tokens, temperature=0) for p in prompts]
    return prompts, [(w.text, len(rt.encode(p)), len(w.new_ids)) for p, w in zip(prompts, want)]


def run_clients(server, prompts, want, first, count, threads=8, new_tokens=3):
    """`count` requests i = first.. from `threads` threads: i % 5 == 0 streams and hangs up after the
    first chunk, i % 5 == 1 streams to the end, the rest are whole; each reply is checked against the
    greedy reply its own prompt gets alone. Returns the failures."""
    failures, lock = [], threading.Lock()

    def worker(k):
        c = server.openai()
        for i in range(first + k, first + count, threads):
            p = i % len(prompts)
            text, n_prompt, n_new = want[p]
            kw = dict(model=MODEL, messages=prompts[p], max_tokens=n_new, temperature=0)
            try:
                if i % 5 == 0:
                    stream = c.chat.completions.create(**kw, stream=True)
                    first_chunk = next(iter(stream))
                    stream.close()
                    ok = first_chunk.choices[0].delta.role == "assistant"
                elif i % 5 == 1:
                    chunks = list(c.chat.completions.create(**kw, stream=True,
                                                            stream_options={"include_usage": True}))
                    got = "".join(x.choices[0].delta.content or "" for x in chunks if x.choices)
                    ok = got == text and chunks[-1].usage.prompt_tokens == n_prompt
                else:
                    r = c.chat.completions.create(**kw)
                    ok = (r.choices[0].message.content == text and r.usage.prompt_tokens == n_prompt
                          and r.usage.completion_tokens == n_new)
            except Exception as e:      # noqa: BLE001 - every failure is collected and reported
                ok = f"{type(e).__name__}: {e}"
            if ok is not True:
                with lock:
                    failures.append((i, ok))
        c.close()

    pool = [threading.Thread(target=worker, args=(k,)) for k in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join(600)
    assert not any(t.is_alive() for t in pool), "a client thread hung"
    return failures


def os_threads(proc, at_most=None, timeout_s=10):
    """The process's OS thread count once it is steady (a joined Python thread leaves /proc a moment
    after join returns): two equal reads 0.1 s apart, and not above at_most unless timeout_s passes."""
    deadline, last = time.monotonic() + timeout_s, -1
    while True:
        n = proc.num_threads()
        if (n == last and (at_most is None or n <= at_most)) or time.monotonic() > deadline:
            return n
        last = n
        time.sleep(0.1)


def soak(rt, server, http, total, warmup=96):
    prompts, want = soak_prompts(rt)
    proc = psutil.Process()
    assert run_clients(server, prompts, want, 0, warmup) == []
    drain(rt)
    threads0, rss0 = os_threads(proc), proc.memory_info().rss
    before = metrics(http)
    t0 = time.perf_counter()
    failures = run_clients(server, prompts, want, warmup, total)
    elapsed = time.perf_counter() - t0
    drain(rt)
    after = metrics(http)
    threads1, rss1 = os_threads(proc, threads0), proc.memory_info().rss
    print(f"\nsoak: {total} requests from 8 threads in {elapsed:.1f} s ({total / elapsed:.0f} requests/s); "
          f"threads {threads0} -> {threads1}; RSS {rss0 / 2 ** 20:.0f} -> {rss1 / 2 ** 20:.0f} MiB")
    assert failures == [], failures[:5]
    assert rt.batcher.busy_slots == 0 and rt.batcher.queue_depth == 0
    assert http.get("/health").json()["slots_busy"] == 0
    # every request reached the batcher; the completed ones produced exactly their tokens
    assert after["hetero_rt_requests_total"] - before["hetero_rt_requests_total"] == total
    completed = [i for i in range(warmup, warmup + total) if i % 5 != 0]
    assert after["hetero_rt_generated_tokens_total"] - before["hetero_rt_generated_tokens_total"] >= sum(
        want[i % len(prompts)][2] for i in completed)
    assert threads1 <= threads0, "threads leaked"
    assert rss1 - rss0 < 64 * 2 ** 20, f"RSS grew by {(rss1 - rss0) / 2 ** 20:.0f} MiB"


def test_soak_1000_requests_8_clients(rt, server, http):
    """1,000 requests (3 tokens each) after a 96-request warm-up; bounds: no failure, all slots free,
    OS thread count not above the warm-up's, RSS growth under 64 MiB."""
    soak(rt, server, http, 1000)


@pytest.mark.slow
def test_soak_10000_requests_8_clients(rt, server, http):
    soak(rt, server, http, 10000)


def test_metrics_export_the_expert_cache_hit_rate_where_one_is_placed(ckpt, tmp_path):
    """With the routed experts on the hetero backend and a 4-slot expert cache per layer (CPU fallback:
    the 'GPU' side on the CPU), /metrics carries hits, misses and their rate, equal to the layers' own
    counters after the requests drained."""
    rules = tmp_path / "hetero.yaml"
    rules.write_text("defaults: {device: cuda, dtype: float32}\nrules:\n  - match: {kind: routed_experts}\n"
                     "    place: {device: cpu, backend: hetero, hetero: {cache: 4}}\n")
    rt = hetero_rt.load(ckpt, rules, cpu_fallback=True, parallel=2)
    with Server(rt) as s, s.http() as h:
        for i in range(3):
            s.openai().chat.completions.create(model=MODEL, messages=[{"role": "user", "content": f"hi {i}"}],
                                               max_tokens=3, temperature=0)
        drain(rt)
        got = metrics(h)
    from hetero_rt.experts.hetero import HeteroExperts
    layers = [m for m in rt.model.modules() if isinstance(m, HeteroExperts)]
    hits, misses = sum(m.counters.hits for m in layers), sum(m.counters.misses for m in layers)
    assert hits + misses > 0 and got["hetero_rt_expert_cache_hits_total"] == hits
    assert got["hetero_rt_expert_cache_misses_total"] == misses
    assert got["hetero_rt_expert_cache_hit_rate"] == pytest.approx(hits / (hits + misses))
