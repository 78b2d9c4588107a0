"""serve.py's OpenAI-compatible server, live on a free 127.0.0.1 port, driven by the official
``openai`` client (and httpx for malformed bodies) against SmolLM2 in float64 on the CPU (so
batching and prefix caching cannot flip a greedy token): completions and chat, streaming and
not, equal to run.py / the engine alone; stop strings cut exactly; 64 concurrent streaming
clients with random disconnects; OpenAI error bodies while a good request completes; /metrics
parsed by prometheus_client. The server runs with prefix caching on."""
from __future__ import annotations

import asyncio
import dataclasses
import json
import random
import re
import socket
import threading
import time
from types import SimpleNamespace

import pytest

pytest.importorskip("fastapi", reason="serve.py's dependencies: pip install -r requirements.txt")
openai = pytest.importorskip("openai", reason="the openai client: pip install -r requirements.txt")
httpx = pytest.importorskip("httpx", reason="httpx: pip install -r requirements.txt")
uvicorn = pytest.importorskip("uvicorn", reason="uvicorn: pip install -r requirements.txt")

import build  # noqa: E402
import run  # noqa: E402

PROMPTS = ["Born in north-east France, Soyer trained as a", "Once upon a time",
           "The capital of Germany is", "Water boils at", "My favourite colour is",
           "def fibonacci(n):", "The three primary colours are", "In 1969, humans"]
MAX_OUT = 12
SHORT = 6      # tokens per request of the 64-client test


@pytest.fixture(scope="module")
def smol_engine(smollm2_gguf, tmp_path_factory):
    out = tmp_path_factory.mktemp("smol_srv") / "engine_fp64"
    rc = build.main(["--gguf_file", smollm2_gguf, "--dtype", "float64", "--output_dir", str(out),
                     "--max_batch_size", "8", "--max_input_len", "256", "--max_output_len",
                     "32"])
    assert rc == 0
    return out


@pytest.fixture(scope="module", params=["process", "thread"])
def server(smol_engine, request):
    """serve.py's two layouts: the HTTP server in a process of its own (the default), and in
    the engine's process (--single_process)."""
    import torch

    from llama_engine.server import build_server, start_http_process
    from llama_engine.serving import LLMEngine
    from llama_engine.tokenizer import load_tokenizer
    torch.set_num_threads(1)
    llm = LLMEngine(str(smol_engine), max_batch_size=8, max_num_tokens=256, device="cpu",
                    max_kv_cache_tokens=8 * 288, enable_prefix_caching=True)
    tok = load_tokenizer(str(smol_engine))
    if request.param == "process":
        http, loop = start_http_process(llm, (load_tokenizer, (str(smol_engine),)), "smol",
                                        max_queue=256)
        base, stop = http.url, http.close
    else:
        app, loop = build_server(llm, tok, "smol", max_queue=256)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        srv = uvicorn.Server(uvicorn.Config(app, log_level="warning",
                                            timeout_graceful_shutdown=1))
        th = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
        th.start()
        deadline = time.monotonic() + 60
        while not srv.started:
            assert th.is_alive() and time.monotonic() < deadline, "server did not start"
            time.sleep(0.05)
        base = f"http://127.0.0.1:{port}"

        def stop():
            srv.should_exit = True
            th.join(10)
    yield SimpleNamespace(base=base, llm=llm, loop=loop, tok=tok, mode=request.param,
                          client=openai.OpenAI(base_url=base + "/v1", api_key="x",
                                               max_retries=0, timeout=120),
                          aclient=lambda: openai.AsyncOpenAI(base_url=base + "/v1",
                                                             api_key="x", max_retries=0,
                                                             timeout=120))
    stop()
    loop.stop()


def wait_idle(s, timeout=60.0):
    """Until the engine thread has no request and every KV block is back."""
    deadline = time.monotonic() + timeout
    while s.loop.num_outstanding or s.llm.block_manager.num_used_blocks:
        assert time.monotonic() < deadline, (s.loop.num_outstanding,
                                             s.llm.block_manager.num_used_blocks)
        time.sleep(0.05)


@pytest.fixture(scope="module")
def run_outputs(smol_engine):
    """run.py's greedy text for the first two prompts."""
    import contextlib
    import io
    buf = io.StringIO()
    args = ["--engine_dir", str(smol_engine), "--max_output_len", str(MAX_OUT), "--device",
            "cpu", *[a for p in PROMPTS[:2] for a in ("--input_text", p)]]
    with contextlib.redirect_stdout(buf):
        assert run.main(args) == 0
    return re.findall(r'^Output: "(.*?)"$', buf.getvalue(), flags=re.S | re.M)


def stream_text(stream) -> tuple[str, list]:
    text, reasons = "", []
    for chunk in stream:
        for c in chunk.choices:
            piece = c.text if hasattr(c, "text") else (c.delta.content or "")
            text += piece or ""
            if c.finish_reason:
                reasons.append(c.finish_reason)
    return text, reasons


def test_completions_equal_run_py(server, run_outputs):
    c = server.client
    assert [m.id for m in c.models.list().data] == ["smol"]
    for prompt, want in zip(PROMPTS[:2], run_outputs):
        r = c.completions.create(model="smol", prompt=prompt, max_tokens=MAX_OUT,
                                 temperature=0)
        assert r.choices[0].text == want
        assert r.choices[0].finish_reason in ("length", "stop")
        assert r.usage.prompt_tokens == len(server.tok.encode(prompt))
        assert 0 < r.usage.completion_tokens <= MAX_OUT
        text, reasons = stream_text(c.completions.create(
            model="smol", prompt=prompt, max_tokens=MAX_OUT, temperature=0, stream=True))
        assert text == want and reasons == [r.choices[0].finish_reason]
    wait_idle(server)


def test_chat_equals_engine_greedy(server):
    c, tok = server.client, server.tok
    messages = [{"role": "system", "content": "You are a terse assistant."},
                {"role": "user", "content": "Name a fruit."}]
    ids = tok.encode_chat(messages)
    r = c.chat.completions.create(model="smol", messages=messages, max_tokens=MAX_OUT,
                                  temperature=0)
    text = r.choices[0].message.content
    assert r.choices[0].message.role == "assistant" and text
    assert r.usage.prompt_tokens == len(ids)
    # The same prompt ids as a plain completion: the same greedy tokens.
    r2 = c.completions.create(model="smol", prompt=ids, max_tokens=MAX_OUT, temperature=0)
    assert r2.choices[0].text == text
    streamed, reasons = stream_text(c.chat.completions.create(
        model="smol", messages=messages, max_tokens=MAX_OUT, temperature=0, stream=True))
    assert streamed == text and reasons == [r.choices[0].finish_reason]
    wait_idle(server)


def test_stop_strings_cut_exactly(server):
    c = server.client
    full = c.completions.create(model="smol", prompt=PROMPTS[0], max_tokens=MAX_OUT,
                                temperature=0, extra_body={
                                    "ignore_eos": True}).choices[0].text
    ids = server.tok.encode(full, add_bos=False)
    pieces = [server.tok.decode(ids[:i]) for i in range(len(ids) + 1)]
    # A stop string across a token boundary: the end of one token and the start of the next.
    k = max(2, len(ids) // 2)
    a, b = pieces[k], pieces[k + 1]
    stop = full[len(a) - 2:len(b)] if len(b) - len(a) >= 1 else full[3:6]
    assert stop and stop in full
    want = full[:full.find(stop)]
    for stream in (False, True):
        r = c.completions.create(model="smol", prompt=PROMPTS[0], max_tokens=MAX_OUT,
                                 temperature=0, stop=[stop, "\u2603never"], stream=stream,
                                 extra_body={"ignore_eos": True})
        if stream:
            text, reasons = stream_text(r)
        else:
            text, reasons = r.choices[0].text, [r.choices[0].finish_reason]
        assert text == want and reasons == ["stop"], (stop, text, want)
    wait_idle(server)


def test_64_concurrent_streams_with_disconnects(server):
    c = server.client
    solo = {p: c.completions.create(model="smol", prompt=p, max_tokens=SHORT,
                                    temperature=0).choices[0].text for p in PROMPTS}
    rng = random.Random(0)
    plan = [(PROMPTS[i % len(PROMPTS)], rng.random() < 0.3, rng.randint(0, 3))
            for i in range(64)]

    async def one(client, prompt, disconnect, after):
        stream = await client.completions.create(
            model="smol", prompt=prompt, max_tokens=SHORT, temperature=0, stream=True)
        text, reasons, chunks = "", [], 0
        async for chunk in stream:
            chunks += 1
            for ch in chunk.choices:
                text += ch.text
                if ch.finish_reason:
                    reasons.append(ch.finish_reason)
            if disconnect and chunks > after:
                await stream.close()
                return None
        return text, reasons

    async def main():
        client = server.aclient()
        try:
            return await asyncio.gather(*(one(client, *p) for p in plan))
        finally:
            await client.close()

    results = asyncio.run(main())
    done = 0
    for (prompt, disconnect, _), res in zip(plan, results):
        if res is None:
            continue
        text, reasons = res
        assert text == solo[prompt] and len(reasons) == 1, (prompt, text, reasons)
        done += 1
    assert done >= 64 - sum(d for _, d, _ in plan)
    wait_idle(server)
    assert server.llm.block_manager.num_used_blocks == 0


def error_of(resp, status):
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return err


def test_malformed_requests_get_openai_errors_while_good_one_completes(server):
    from llama_engine.sampling import SamplingConfig
    url = server.base + "/v1/completions"
    good = {}

    def run_good():
        good["r"] = server.client.completions.create(model="smol", prompt=PROMPTS[1],
                                                     max_tokens=MAX_OUT, temperature=0)
    th = threading.Thread(target=run_good)
    th.start()
    with httpx.Client(timeout=60) as h:
        post = lambda body, u=url: h.post(u, json=body)  # noqa: E731
        base = {"model": "smol", "prompt": "Hello", "max_tokens": 4}
        r = h.post(url, content=b'{"model": "smol", "prompt": ',
                   headers={"Content-Type": "application/json"})
        error_of(r, 400)
        assert error_of(post({**base, "max_tokens": "many"}), 400)["param"] == "max_tokens"
        assert error_of(post({**base, "temperature": [1]}), 400)["param"] == "temperature"
        assert error_of(post({**base, "max_tokens": 0}), 400)["param"] == "max_tokens"
        assert error_of(post({**base, "max_tokens": -3}), 400)["param"] == "max_tokens"
        assert error_of(post({**base, "prompt": "word " * 400}), 413)["code"] == \
            "context_length_exceeded"
        assert error_of(post({**base, "model": "gpt-9"}), 404)["code"] == "model_not_found"
        error_of(post(base, server.base + "/v1/nothing"), 404)
        error_of(post({**base, "stop": [""]}), 400)
        err = error_of(post({"model": "smol", "messages": []},
                            server.base + "/v1/chat/completions"), 400)
        assert err["param"] == "messages"
        if "presence_penalty" not in {f.name for f in dataclasses.fields(SamplingConfig)}:
            assert "not supported" in error_of(post({**base, "presence_penalty": 0.5}),
                                               400)["message"]
        server.loop.max_queue = 0
        try:
            error_of(post(base), 503)
        finally:
            server.loop.max_queue = 256
        assert post(base).status_code == 200       # still serving
    th.join(120)
    assert good["r"].choices[0].text and good["r"].choices[0].finish_reason
    wait_idle(server)


def test_metrics_parse_with_prometheus_parser(server):
    from prometheus_client.parser import text_string_to_metric_families
    long = "The quick brown fox jumps over the lazy dog. " * 18   # several full KV blocks
    for _ in range(2):
        server.client.completions.create(model="smol", prompt=long, max_tokens=2, temperature=0)
    with httpx.Client(timeout=30) as h:
        assert h.get(server.base + "/health").json() == {"status": "ok"}
        text = h.get(server.base + "/metrics").text
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    for name in ("llama_engine_num_requests_running", "llama_engine_num_requests_waiting",
                 "llama_engine_kv_cache_blocks_used", "llama_engine_prompt_tokens",
                 "llama_engine_generation_tokens", "llama_engine_time_to_first_token_seconds",
                 "llama_engine_time_per_output_token_seconds",
                 "llama_engine_prefix_cache_hit_rate"):
        assert name in fams, name
    val = {s.name: s.value for f in fams.values() for s in f.samples}
    assert val["llama_engine_generation_tokens_total"] > 0
    assert val["llama_engine_time_to_first_token_seconds_count"] > 0
    # The long prompt's second time found its full blocks cached.
    assert 0 < val["llama_engine_prefix_cache_hit_rate"] <= 1


def teacher_forced(server, prompt_ids, n):
    """Greedy continuation of ``prompt_ids`` (the static engine, its own cache), and the
    teacher-forced log-softmax of every position of prompt + continuation (the engine's own numbers: fp32
    logits of the float64 model, so values agree to fp32's rounding of a log-softmax)."""
    import torch
    eng = server.llm.engine
    ids = list(prompt_ids) + eng.generate([list(prompt_ids)], n).output_ids[0]
    lsm = torch.log_softmax(eng.forward_logits(ids).float(), -1)
    return ids[len(prompt_ids):], lsm[len(prompt_ids) - 1:-1]


def test_logprobs_equal_engine_log_softmax(server):
    c, tok, n = server.client, server.tok, 6
    prompt = PROMPTS[2]
    want_ids, lsm = teacher_forced(server, tok.encode(prompt), n)
    want_text = tok.decode(want_ids)
    kw = dict(model="smol", max_tokens=n, temperature=0, extra_body={"ignore_eos": True})
    # /v1/completions: logprobs=3
    r = c.completions.create(prompt=prompt, logprobs=3, **kw)
    ch = r.choices[0]
    assert ch.text == want_text
    lp = ch.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == n
    for k, t in enumerate(want_ids):
        assert abs(lp.token_logprobs[k] - float(lsm[k, t])) < 1e-5, k
        top = lsm[k].topk(3)
        assert sorted(lp.top_logprobs[k].values(), reverse=True)[:3] == pytest.approx(
            top.values.tolist(), abs=1e-5)
        assert lp.tokens[k] in lp.top_logprobs[k]         # greedy: the chosen one is top
    assert "".join(lp.tokens) == want_text
    assert lp.text_offset == [len("".join(lp.tokens[:k])) for k in range(n)]
    # streamed: the chunks carry the same entries, each with its own text
    chunks = list(c.completions.create(prompt=prompt, logprobs=3, stream=True, **kw))
    got = [x for ck in chunks for ch in ck.choices if ch.logprobs for x in
           zip(ch.logprobs.tokens, ch.logprobs.token_logprobs, ch.logprobs.text_offset)]
    assert got == list(zip(lp.tokens, lp.token_logprobs, lp.text_offset))
    for ck in chunks:
        for ch in ck.choices:
            if ch.logprobs:
                assert ch.text == "".join(ch.logprobs.tokens)
    # /v1/chat/completions: logprobs + top_logprobs, streaming and not
    messages = [{"role": "user", "content": "Name a colour."}]
    want_ids, lsm = teacher_forced(server, tok.encode_chat(messages), n)
    r = c.chat.completions.create(messages=messages, logprobs=True, top_logprobs=2, **kw)
    content = r.choices[0].logprobs.content
    assert [e.logprob for e in content] == pytest.approx(
        [float(lsm[k, t]) for k, t in enumerate(want_ids)], abs=1e-5)
    assert all(len(e.top_logprobs) == 2 and e.top_logprobs[0].logprob == e.logprob
               for e in content)
    assert bytes(b for e in content for b in e.bytes).decode() == \
        r.choices[0].message.content == tok.decode(want_ids)
    streamed = [e for ck in c.chat.completions.create(messages=messages, logprobs=True,
                                                      top_logprobs=2, stream=True, **kw)
                for ch in ck.choices if ch.logprobs for e in ch.logprobs.content]
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in content]
    wait_idle(server)


def test_logprobs_with_stop_string_n_and_echo(server):
    c = server.client
    kw = dict(model="smol", prompt=PROMPTS[0], max_tokens=8, temperature=0,
              extra_body={"ignore_eos": True})
    full = c.completions.create(logprobs=0, **kw).choices[0]
    stop = full.text[len(full.text) // 2:len(full.text) // 2 + 3]
    cut = full.text[:full.text.find(stop)]
    r = c.completions.create(logprobs=0, stop=[stop], n=2, **kw)
    assert [ch.index for ch in r.choices] == [0, 1]
    for ch in r.choices:
        assert ch.text == cut and ch.finish_reason == "stop"
        # the tokens whose text starts before the cut, and their values unchanged
        k = len(ch.logprobs.tokens)
        assert ch.logprobs.token_logprobs == full.logprobs.token_logprobs[:k]
        assert ch.logprobs.text_offset[-1] < len(cut) <= len("".join(ch.logprobs.tokens))
    assert r.usage.completion_tokens >= 2 * k
    echo = c.completions.create(echo=True, **kw).choices[0].text
    assert echo == PROMPTS[0] + full.text
    streamed, _ = stream_text(c.completions.create(echo=True, stream=True, **kw))
    assert streamed == echo
    wait_idle(server)


def test_openai_client_extras(server):
    c = server.client
    messages = [{"role": "user", "content": "Say hi."}]
    r = c.chat.completions.create(model="smol", messages=messages, max_completion_tokens=3,
                                  temperature=0, user="someone",
                                  response_format={"type": "text"}, tool_choice="none")
    assert r.usage.completion_tokens <= 3
    chunks = list(c.chat.completions.create(model="smol", messages=messages, max_tokens=3,
                                            temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens <= 3
    assert all(ck.usage is None for ck in chunks[:-1])
    assert c.models.retrieve("smol").id == "smol"
    with pytest.raises(openai.NotFoundError):
        c.models.retrieve("gpt-9")
    # several prompts in one request: choice j*n+i is prompt j's i-th, each as if alone
    two = c.completions.create(model="smol", prompt=PROMPTS[3:5], max_tokens=3, n=2,
                               temperature=0)
    alone = [c.completions.create(model="smol", prompt=p, max_tokens=3,
                                  temperature=0).choices[0].text for p in PROMPTS[3:5]]
    assert [(ch.index, ch.text) for ch in two.choices] == [
        (0, alone[0]), (1, alone[0]), (2, alone[1]), (3, alone[1])]
    assert two.usage.prompt_tokens == sum(len(server.tok.encode(p)) for p in PROMPTS[3:5])
    with httpx.Client(timeout=60) as h:
        chat = server.base + "/v1/chat/completions"
        base = {"model": "smol", "messages": messages, "max_tokens": 3}
        for field, value in (("tools", [{"type": "function", "function": {"name": "f"}}]),
                             ("response_format", {"type": "json_object"}),
                             ("logit_bias", {"5": 10}), ("top_logprobs", 2)):
            err = error_of(h.post(chat, json={**base, field: value}), 400)
            assert err["param"] == field and field in err["message"], err
        comp = server.base + "/v1/completions"
        base = {"model": "smol", "prompt": "Hi", "max_tokens": 3}
        for extra, field in (({"echo": True, "logprobs": 1}, "echo"), ({"suffix": "x"},
                                                                       "suffix")):
            assert error_of(h.post(comp, json={**base, **extra}), 400)["param"] == field
    wait_idle(server)
