"""A CPU model of the HTTP server on a GPU: why one process loses throughput, and what the
process split (llama_engine/server/remote.py) gives.

On a GPU each engine step is mostly a wait for the device, during which the engine thread
does not hold the interpreter lock. Here a tiny model runs on the CPU and every engine step
is followed by a sleep of ``--step_ms`` (which releases the lock as that wait does), so the
HTTP side's per-token Python competes with the engine as it does on a GPU. The same load runs
through ``LLMEngine.generate`` directly and through the server, in either layout:

    python tools/cpu_http_model.py --layout process     # serve.py's default
    python tools/cpu_http_model.py --layout single      # serve.py --single_process

Prints one JSON line: direct and HTTP tok/s, their ratio, and the CPU time per token of the
engine's process and (process layout) of the HTTP process. The aiohttp client runs in a
third process; on a machine with few cores it competes with both.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _proc_cpu_s(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class _SingleProcess:
    """serve.py --single_process: the app on a uvicorn thread of this process."""

    def __init__(self, llm, vocab: int):
        import uvicorn

        from benchmarks.http_load import bench_tokenizer
        from llama_engine.server import build_server
        app, self.loop = build_server(llm, bench_tokenizer(vocab), "bench", max_queue=1 << 20)
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", backlog=4096))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]},
                                       daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.05)
        self.http_pid = None

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.loop.stop()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layout", choices=("process", "single"), default="process")
    p.add_argument("--step_ms", type=float, default=20.0, help="the modelled GPU wait a step")
    p.add_argument("--num_requests", type=int, default=512)
    p.add_argument("--input_len", type=int, default=16)
    p.add_argument("--output_len", type=int, default=32)
    a = p.parse_args(argv)

    import torch

    from benchmarks import http_load as H
    from benchmarks.device import random_prompts
    from benchmarks.weights import Weights
    from llama_engine import model_runner

    torch.set_num_threads(1)
    execute = model_runner.ModelRunner.execute

    def step_then_wait(self, *args, **kw):
        out = execute(self, *args, **kw)
        time.sleep(a.step_ms / 1000)
        return out
    model_runner.ModelRunner.execute = step_then_wait

    w = Weights("tiny", "cpu")
    eng = w.engine("fp16", H.MAX_BATCH, 2048, 512)
    vocab = w.args.vocab_size
    prompts = random_prompts(a.num_requests, a.input_len, vocab, seed=0)
    tokens = a.num_requests * a.output_len
    llm = H._llm(eng)
    llm.generate(prompts[:4], 8)
    t = time.perf_counter()
    llm.generate(prompts, a.output_len)
    direct = tokens / (time.perf_counter() - t)
    if a.layout == "process":
        srv = H.LiveServer(llm, vocab)
        http_pid = srv.http.proc.pid
    else:
        srv = _SingleProcess(llm, vocab)
        http_pid = None
    try:
        H.drive(srv.url, prompts[:4], 8)
        c0, h0 = time.process_time(), _proc_cpu_s(http_pid) if http_pid else 0.0
        res = H.summarize(H.drive(srv.url, prompts, a.output_len))
        c1, h1 = time.process_time(), _proc_cpu_s(http_pid) if http_pid else 0.0
    finally:
        srv.close()
    out = {"layout": a.layout, "step_ms": a.step_ms, "direct_tok_s": round(direct),
           "http_tok_s": round(res["tokens_per_s"]),
           "http_vs_direct": round(res["tokens_per_s"] / direct, 3),
           "engine_process_cpu_us_per_token": round((c1 - c0) / tokens * 1e6, 1)}
    if http_pid:
        out["http_process_cpu_us_per_token"] = round((h1 - h0) / tokens * 1e6, 1)
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
