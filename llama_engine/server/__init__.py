"""An OpenAI-compatible HTTP server over the inflight-batching ``LLMEngine`` (``serve.py``).

``protocol`` (request bodies, errors, the OpenAI -> SamplingConfig mapping), ``logprobs``
(OpenAI's log-prob shapes, token bytes), ``loop`` (the engine thread), ``metrics``
(Prometheus), ``app`` (the FastAPI routes; text streams are ``text_stream.IncrementalText``)
and ``build_server`` here, which wires them in this process:

    server = build_server(llm, tokenizer, "smollm2")      # -> (app, EngineLoop)

or ``start_http_process``, which serves the same app from a process of its own (``remote``:
the HTTP side then never holds the engine's interpreter lock; serve.py's default):

    http, loop = start_http_process(llm, (load_tokenizer, (path,)), "smollm2", port=8000)

Needs fastapi, uvicorn and prometheus_client (requirements.txt); imported only by serve.py
and the tests.
"""
from __future__ import annotations

from .app import ServerState, create_app
from .loop import EngineLoop
from .metrics import ServerMetrics
from .remote import HttpProcess


def build_server(llm, tokenizer, model_name: str, max_queue: int = 4096,
                 stream_interval: int = 1):
    """The app and its started engine thread for ``llm`` (an LLMEngine)."""
    metrics = ServerMetrics(model_name)
    loop = EngineLoop(llm, metrics, max_queue=max_queue,
                      stream_interval=stream_interval).start()
    app = create_app(ServerState.for_engine(loop, tokenizer, model_name, metrics))
    return app, loop


def start_http_process(llm, tokenizer: tuple, model_name: str, host: str = "127.0.0.1",
                       port: int = 0, max_queue: int = 4096, stream_interval: int = 1,
                       log_level: str = "warning"):
    """The engine thread here and the HTTP server in a spawned process. ``tokenizer``:
    ``(function, args)`` that makes it there. -> (HttpProcess, EngineLoop); close both."""
    metrics = ServerMetrics(model_name)
    loop = EngineLoop(llm, metrics, max_queue=1 << 62,    # the HTTP process enforces it
                      stream_interval=stream_interval).start()
    try:
        http = HttpProcess(loop, metrics, tokenizer, model_name, ServerState.limits(llm),
                           host=host, port=port, max_queue=max_queue, log_level=log_level)
    except BaseException:
        loop.stop()
        raise
    return http, loop


__all__ = ["EngineLoop", "HttpProcess", "ServerMetrics", "ServerState", "build_server",
           "create_app", "start_http_process"]
