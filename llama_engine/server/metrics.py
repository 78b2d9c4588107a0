"""The server's Prometheus metrics (prometheus_client, one registry per server): requests
running and waiting, KV blocks used, prompt and generated tokens, time to first token and
time per output token histograms, finished requests by reason, and the prefix-cache hit
rate. The engine thread updates them after each step (``observe_step``) and for each finished
request (``observe_finished``); ``/metrics`` renders ``render()``."""
from __future__ import annotations

from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge,
                               Histogram, generate_latest)

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5,
                    0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)

CONTENT_TYPE = CONTENT_TYPE_LATEST


class ServerMetrics:
    def __init__(self, model_name: str):
        self.registry = r = CollectorRegistry()
        p, lab = "llama_engine_", ["model_name"]
        self.running = Gauge(p + "num_requests_running", "Requests in the running batch",
                             lab, registry=r).labels(model_name)
        self.waiting = Gauge(p + "num_requests_waiting", "Requests queued or preempted",
                             lab, registry=r).labels(model_name)
        self.kv_used = Gauge(p + "kv_cache_blocks_used", "KV cache blocks held by requests",
                             lab, registry=r).labels(model_name)
        self.kv_total = Gauge(p + "kv_cache_blocks_total", "KV cache blocks",
                              lab, registry=r).labels(model_name)
        self.prompt_tokens = Counter(p + "prompt_tokens", "Prompt tokens of finished requests",
                                     lab, registry=r).labels(model_name)
        self.generation_tokens = Counter(p + "generation_tokens", "Generated tokens",
                                         lab, registry=r).labels(model_name)
        self._finished = Counter(p + "request_success", "Finished requests by reason",
                                 lab + ["finished_reason"], registry=r)
        self.model_name = model_name
        self.ttft = Histogram(p + "time_to_first_token_seconds", "Time to first token",
                              lab, buckets=_LATENCY_BUCKETS, registry=r).labels(model_name)
        self.tpot = Histogram(p + "time_per_output_token_seconds",
                              "Mean time per output token after the first, per request",
                              lab, buckets=_LATENCY_BUCKETS, registry=r).labels(model_name)
        self.prefix_queries = Counter(p + "prefix_cache_queries",
                                      "Tokens of admitted requests looked up in the prefix cache",
                                      lab, registry=r).labels(model_name)
        self.prefix_hits = Counter(p + "prefix_cache_hits",
                                   "Tokens found in the prefix cache", lab,
                                   registry=r).labels(model_name)
        self.prefix_hit_rate = Gauge(p + "prefix_cache_hit_rate",
                                     "Prefix-cache hits / queries (tokens) since start", lab,
                                     registry=r).labels(model_name)
        self._seen_queries = self._seen_hits = 0

    def observe_step(self, llm, new_tokens: int) -> None:
        sched, bm = llm.scheduler, llm.block_manager
        self.running.set(len(sched.running))
        self.waiting.set(len(sched.waiting))
        self.kv_used.set(bm.num_used_blocks)
        self.kv_total.set(bm.num_blocks)
        self.generation_tokens.inc(new_tokens)
        q, h = bm.prefix_query_tokens, bm.prefix_hit_tokens
        self.prefix_queries.inc(q - self._seen_queries)
        self.prefix_hits.inc(h - self._seen_hits)
        self._seen_queries, self._seen_hits = q, h
        self.prefix_hit_rate.set(bm.prefix_hit_rate)

    def observe_finished(self, seq, reason: str) -> None:
        self._finished.labels(self.model_name, reason).inc()
        self.prompt_tokens.inc(seq.num_prompt_tokens)
        if seq.ttft is not None:
            self.ttft.observe(seq.ttft)
        if seq.tpot is not None:
            self.tpot.observe(seq.tpot)

    def render(self) -> bytes:
        return generate_latest(self.registry)
