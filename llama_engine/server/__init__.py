"""An OpenAI-compatible HTTP server over the inflight-batching ``LLMEngine`` (``serve.py``).

``protocol`` (request bodies, errors, the OpenAI -> SamplingConfig mapping), ``logprobs``
(OpenAI's log-prob shapes, token bytes), ``loop`` (the engine thread), ``metrics``
(Prometheus), ``app`` (the FastAPI routes; text streams are ``text_stream.IncrementalText``)
and ``build_server`` here, which wires them:

    server = build_server(llm, tokenizer, "smollm2")      # -> (app, EngineLoop)

Needs fastapi, uvicorn and prometheus_client (requirements.txt); imported only by serve.py
and the tests.
"""
from __future__ import annotations

from .app import ServerState, create_app
from .loop import EngineLoop
from .metrics import ServerMetrics


def build_server(llm, tokenizer, model_name: str, max_queue: int = 4096):
    """The app and its started engine thread for ``llm`` (an LLMEngine)."""
    metrics = ServerMetrics(model_name)
    loop = EngineLoop(llm, metrics, max_queue=max_queue).start()
    app = create_app(ServerState.for_engine(loop, tokenizer, model_name, metrics))
    return app, loop


__all__ = ["EngineLoop", "ServerMetrics", "ServerState", "build_server", "create_app"]
