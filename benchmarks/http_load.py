"""The server under HTTP load (``benchmark.py --serving --http``): serve.py's app on an engine
with random weights (the engine thread here, the HTTP server in its own process, as serve.py
runs by default), driven by streaming clients in a third process, against ``LLMEngine`` driven
directly in the same run.

* ``uniform``: ``num_requests`` x 128 in / 128 out sent at once by concurrent streaming
  clients; output tokens/s over HTTP against ``LLMEngine.generate`` of the same load, and the
  clients' TTFT p50/p99 (target: >= 95% of direct).
* ``prefix``: 500 requests sharing a 1,024-token prefix with 64 distinct tokens each, 128 out,
  over HTTP with ``--enable_prefix_caching`` off and on (target: >= 2x throughput, <= 0.5x
  mean TTFT).
* ``poisson``: 128/128 requests arriving as a Poisson process over HTTP at each rate
  (``--poisson_rates``, else ``DEFAULT_RATES``; at most ``POISSON_REQUESTS`` per rate), written
  in the shape of ``serving.run_serving_poisson`` (the same table and throughput-versus-latency
  plot).

Results are rows the serving table prints as they are (``uniform_128_128_http``,
``uniform_128_128_direct``, ``prefix_1024_no_reuse_http``, ``prefix_1024_reuse_http``: output
tok/s, TTFT p50 / p99, ...), the ratios against the targets (``http_vs_direct``,
``http_prefix_ratios``) and ``poisson``. On the CPU (``--device cpu --model_config tiny``) the
same flow dry-runs with short prompts and outputs (``Shape.cpu``).

Prompts are sent as token ids; ``ignore_eos`` keeps every output at full length. The server
detokenizes with SmolLM2's tokenizer when it is fetched, else with ``IdTokenizer`` (ids as
numbers), recorded as ``tokenizer`` in the results.

The client half runs as ``python -m benchmarks.http_load --client SPEC.json`` and prints one
JSON line.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from typing import Optional

from llama_engine.serving.llm_engine import LLMEngine, latency_stats, percentile

MAX_BATCH = 256
DEFAULT_RATES = (8.0, 16.0, 32.0, 64.0)
POISSON_REQUESTS = 256


class Shape:
    """Request lengths: the issue's on a GPU, a few tokens on the CPU's dry run."""

    def __init__(self, cpu: bool):
        self.input, self.output = (16, 8) if cpu else (128, 128)
        self.prefix, self.suffix = (64, 8) if cpu else (1024, 64)
        self.warmup = 4 if cpu else 64


class IdTokenizer:
    """Stands in for a tokenizer on random weights: id ``i`` reads as ``" i"``."""

    source = "ids"
    end_ids: list = []
    has_chat_template = False

    def __init__(self, vocab: int):
        self.vocab_size = vocab

    def encode(self, text: str, add_bos: bool = True) -> list:
        return [int(t) for t in text.split()]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return "".join(f" {int(i)}" for i in ids)


def server_tokenizer(vocab: int):
    try:
        sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(
            os.path.abspath(__file__))), "tools"))
        from fetch_smollm2 import find_smollm2_gguf

        from llama_engine.tokenizer import load_tokenizer
        path = find_smollm2_gguf()
        if path:
            tok = load_tokenizer(str(path))
            tok.end_ids = []  # noqa: random weights: no end token
            return tok, "smollm2"
    except Exception:  # noqa: BLE001 - the id tokenizer is the fallback
        pass
    return IdTokenizer(vocab), "ids"


def bench_tokenizer(vocab: int):
    """The server's tokenizer, made in the HTTP process (start_http_process)."""
    return server_tokenizer(vocab)[0]


class LiveServer:
    """serve.py's server on ``llm``: the engine thread in this process, uvicorn and the app in
    a spawned one (serve.py's default), on a free 127.0.0.1 port."""

    def __init__(self, llm: LLMEngine, vocab: int, stream_interval: int = 1):
        from llama_engine.server import start_http_process
        self.tokenizer = server_tokenizer(vocab)[1]
        self.http, self.loop = start_http_process(llm, (bench_tokenizer, (vocab,)), "bench",
                                                  max_queue=1_000_000,
                                                  stream_interval=stream_interval)
        self.url = self.http.url

    def close(self) -> None:
        self.http.close(30)
        self.loop.stop()


def drive(url: str, prompts: list, max_tokens: int, rate: Optional[float] = None) -> dict:
    """Run the client process; -> its JSON (per-request ttft/latency/tokens and the span)."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump({"url": url, "prompts": prompts, "max_tokens": max_tokens, "rate": rate}, f)
    try:
        p = subprocess.run([sys.executable, "-m", "benchmarks.http_load", "--client", f.name],
                           capture_output=True, text=True, check=False,
                           cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    finally:
        os.unlink(f.name)
    if p.returncode != 0:
        raise RuntimeError(f"HTTP client failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def summarize(res: dict) -> dict:
    rows = [r for r in res["requests"] if r.get("ok")]
    tokens = sum(r["tokens"] for r in rows)
    span = res["span_s"]
    out = {"num_requests": len(rows), "failed": len(res["requests"]) - len(rows),
           "output_tokens": tokens, "elapsed_s": span,
           "tokens_per_s": tokens / span if span > 0 else 0.0,
           "client": f"{res.get('client', 'httpx')} on {res.get('loop', 'asyncio')}",
           "server": _server_stack()}
    for name in ("ttft", "tpot"):
        vals = sorted(r[name] for r in rows if r.get(name) is not None)
        if vals:
            out[f"{name}_p50_s"] = percentile(vals, 50)
            out[f"{name}_p99_s"] = percentile(vals, 99)
            out[f"{name}_mean_s"] = sum(vals) / len(vals)
    return out


def _server_stack() -> str:
    """What uvicorn's "auto" picks here: uvloop and httptools where installed."""
    import importlib.util
    loop = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
    http = "httptools" if importlib.util.find_spec("httptools") else "h11"
    return f"uvicorn ({loop}, {http})"


def _llm(eng, prefix_caching: bool = False) -> LLMEngine:
    return LLMEngine(eng, max_batch_size=MAX_BATCH, max_num_tokens=8192,
                     enable_prefix_caching=prefix_caching)


def run_uniform(eng, vocab: int, num_requests: int, shape: Shape, seed: int = 0,
                stream_intervals=(1,)) -> dict:
    """LLMEngine directly, then over HTTP once per stream interval. -> {"direct": row,
    interval: row with "http_vs_direct"}."""
    from .device import random_prompts, sync
    prompts = random_prompts(num_requests, shape.input, vocab, seed=seed)
    llm = _llm(eng)
    llm.generate(prompts[:shape.warmup], 8)                      # warm-up
    sync(eng.device)
    direct = latency_stats(llm.generate(prompts, shape.output))
    out: dict = {"direct": direct}
    for interval in stream_intervals:
        srv = LiveServer(llm, vocab, stream_interval=interval)
        try:
            drive(srv.url, prompts[:shape.warmup], 8)            # warm-up over HTTP
            http = summarize(drive(srv.url, prompts, shape.output))
        finally:
            srv.close()
        http.update(tokenizer=srv.tokenizer, stream_interval=interval,
                    http_vs_direct=http["tokens_per_s"] / direct["tokens_per_s"])
        out[interval] = http
    return out


def prefix_prompts(n: int, vocab: int, prefix_len: int = 1024, suffix_len: int = 64) -> list:
    rng = random.Random(5)
    prefix = [rng.randrange(3, vocab) for _ in range(prefix_len)]
    return [prefix + [rng.randrange(3, vocab) for _ in range(suffix_len)] for _ in range(n)]


def run_prefix(eng, vocab: int, num_requests: int, shape: Shape) -> dict:
    from .device import free_memory
    prompts = prefix_prompts(num_requests, vocab, shape.prefix, shape.suffix)
    out = {"num_requests": num_requests, "prefix": shape.prefix, "suffix": shape.suffix,
           "output": shape.output}
    for on in (False, True):
        llm = _llm(eng, prefix_caching=on)
        # warm-up (with caching on, it caches the prefix)
        llm.generate([p[:-shape.suffix] + p[-shape.suffix:][::-1] for p in prompts[:8]], 4)
        srv = LiveServer(llm, vocab)
        try:
            row = summarize(drive(srv.url, prompts, shape.output))
        finally:
            srv.close()
        row["prefix_hit_rate"] = llm.block_manager.prefix_hit_rate
        out["reuse" if on else "no_reuse"] = row
        print("prefix", "on" if on else "off", json.dumps(row), flush=True)
        del llm, srv
        free_memory(eng.device)
    out["throughput_ratio"] = out["reuse"]["tokens_per_s"] / out["no_reuse"]["tokens_per_s"]
    out["mean_ttft_ratio"] = out["reuse"]["ttft_mean_s"] / out["no_reuse"]["ttft_mean_s"]
    return out


def run_poisson_http(eng, vocab: int, rates: list, num_requests: int, shape: Shape) -> dict:
    from .device import random_prompts
    llm = _llm(eng)
    prompts = random_prompts(num_requests, shape.input, vocab, seed=2)
    llm.generate(prompts[:shape.warmup], 8)
    srv = LiveServer(llm, vocab)
    out = {}
    try:
        for r in rates:
            out[f"{r:g}/s"] = {"rate_per_s": r, "via": "http",
                               **summarize(drive(srv.url, prompts, shape.output, rate=r))}
            print("poisson_http", json.dumps(out[f"{r:g}/s"]), flush=True)
    finally:
        srv.close()
    return out


PARTS = ("uniform", "prefix", "poisson")


def run_http(weights, parts: set, num_requests: int, rates: Optional[list] = None,
             save=None, stream_intervals=(1,)) -> dict:
    """The HTTP scenarios (``parts`` of PARTS; ``rates`` given: the Poisson sweep alone) on
    one fp16 engine of ``weights`` (benchmarks.weights.Weights)."""
    from .device import free_memory
    eng = weights.engine("fp16", MAX_BATCH, 2048, 512)
    vocab = weights.args.vocab_size
    shape = Shape(cpu=str(eng.device).startswith("cpu"))
    save = save or (lambda _: None)
    out: dict = {}
    if rates:
        parts = {"poisson"}
    if "uniform" in parts:
        r = run_uniform(eng, vocab, num_requests, shape, stream_intervals=stream_intervals)
        name = f"uniform_{shape.input}_{shape.output}"
        out[f"{name}_direct"] = r.pop("direct")
        for interval, h in r.items():
            key = f"{name}_http" + (f"_si{interval}" if interval != 1 else "")
            out[key] = h
            if interval == stream_intervals[0]:
                out["http_vs_direct"] = h["http_vs_direct"]
            print(f"HTTP {num_requests} x {shape.input}/{shape.output}, stream interval "
                  f"{interval}: {h['tokens_per_s']:.0f} tok/s, {h['http_vs_direct']:.3f} of "
                  f"LLMEngine directly (target >= 0.95); TTFT p50 "
                  f"{h.get('ttft_p50_s', float('nan')):.3f} s, p99 "
                  f"{h.get('ttft_p99_s', float('nan')):.3f} s; {h['failed']} failed", flush=True)
        save(out)
    free_memory(eng.device)    # the last part's KV cache, before the next sizes its own
    if "prefix" in parts:
        r = run_prefix(eng, vocab, min(500, num_requests), shape)
        name = f"prefix_{shape.prefix}"
        out.update({f"{name}_no_reuse_http": r.pop("no_reuse"),
                    f"{name}_reuse_http": r.pop("reuse"), "http_prefix_ratios": r})
        print(f"HTTP prefix reuse: throughput {r['throughput_ratio']:.2f}x (target >= 2), "
              f"mean TTFT {r['mean_ttft_ratio']:.2f}x (target <= 0.5)", flush=True)
        save(out)
    free_memory(eng.device)
    if "poisson" in parts:
        out["poisson"] = run_poisson_http(eng, vocab, list(rates or DEFAULT_RATES),
                                          min(num_requests, POISSON_REQUESTS), shape)
        save(out)
    return out


# -- the client process ----------------------------------------------------------------------
def _chunk_line(line: str, times: list, state: dict) -> None:
    """One SSE line: a text chunk's arrival time, or the usage chunk's token count."""
    if not line.startswith("data: ") or line == "data: [DONE]":
        return
    chunk = json.loads(line[6:])
    if chunk.get("usage"):
        state["tokens"] = chunk["usage"]["completion_tokens"]
    elif chunk.get("choices") and chunk["choices"][0].get("text"):
        times.append(time.perf_counter())


async def _one(client, url: str, prompt: list, max_tokens: int, delay: float, t0: float) -> dict:
    await asyncio.sleep(max(0.0, t0 + delay - time.perf_counter()))
    sent = time.perf_counter()
    body = {"model": "bench", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    times, state = [], {"tokens": 0}
    try:
        if CLIENT_LIB == "aiohttp":
            async with client.post(url + "/v1/completions", json=body) as r:
                if r.status != 200:
                    return {"ok": False, "status": r.status}
                async for raw in r.content:
                    _chunk_line(raw.decode().rstrip("\r\n"), times, state)
        else:
            async with client.stream("POST", url + "/v1/completions", json=body) as r:
                if r.status_code != 200:
                    return {"ok": False, "status": r.status_code}
                async for line in r.aiter_lines():
                    _chunk_line(line, times, state)
    except Exception as e:  # noqa: BLE001 - counted as failed
        return {"ok": False, "error": f"{type(e).__name__}: {e}"}
    end = time.perf_counter()
    tokens = state["tokens"]
    return {"ok": bool(times), "tokens": tokens, "sent": sent, "end": end,
            "ttft": times[0] - sent if times else None,
            "tpot": (times[-1] - times[0]) / (tokens - 1) if times and tokens > 1 else None}


def _pick_client_lib() -> str:
    """aiohttp where installed (several times less CPU per streamed chunk than httpx, which
    matters with a thousand streams in one process), else httpx."""
    try:
        import aiohttp  # noqa: F401
        return "aiohttp"
    except ImportError:
        return "httpx"


CLIENT_LIB = _pick_client_lib()


async def _client(spec: dict) -> dict:
    prompts, rate = spec["prompts"], spec.get("rate")
    rng = random.Random(0)
    delays, t = [], 0.0
    for _ in prompts:
        delays.append(t)
        if rate:
            t += rng.expovariate(rate)

    async def run(client):
        t0 = time.perf_counter()
        return await asyncio.gather(*(_one(client, spec["url"], p, spec["max_tokens"], d, t0)
                                      for p, d in zip(prompts, delays)))
    if CLIENT_LIB == "aiohttp":
        import aiohttp
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                         timeout=aiohttp.ClientTimeout(total=None)) as client:
            reqs = await run(client)
    else:
        import httpx
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
        async with httpx.AsyncClient(timeout=httpx.Timeout(None), limits=limits) as client:
            reqs = await run(client)
    ok = [r for r in reqs if r.get("ok")]
    span = (max(r["end"] for r in ok) - min(r["sent"] for r in ok)) if ok else 0.0
    return {"span_s": span, "requests": reqs, "client": CLIENT_LIB, "loop": _loop_name()}


def _loop_name() -> str:
    return type(asyncio.get_running_loop()).__module__.split(".")[0]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="the HTTP client half of benchmark.py --http")
    p.add_argument("--client", required=True, help="JSON spec: url, prompts, max_tokens, rate")
    a = p.parse_args(argv)
    with open(a.client) as f:
        spec = json.load(f)
    try:
        import uvloop
        run = uvloop.run
    except ImportError:
        run = asyncio.run
    print(json.dumps(run(_client(spec))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
