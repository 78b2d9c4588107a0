"""The HTTP side: a FastAPI (ASGI) app answering the OpenAI API over an ``EngineLoop``.

Endpoints: ``POST /v1/completions`` (one prompt or a list), ``POST /v1/chat/completions``
(the tokenizer's chat template), ``GET /v1/models`` (and ``/v1/models/{id}``), ``GET
/health``, ``GET /metrics`` (Prometheus text). Streaming is server-sent events in OpenAI's
chunk format, ending with ``data: [DONE]``. Handlers only
await queues, so the event loop never waits on a model step; a client that goes away cancels
its request (its KV blocks are freed by the engine thread). Every error is OpenAI's JSON error
body (protocol.py) with the HTTP status: 400 bad request, 404 unknown model or route, 413
prompt longer than the engine takes, 503 over the queue depth, 500 engine failure.
"""
from __future__ import annotations

import asyncio
import inspect
import json
import time
import uuid
from dataclasses import dataclass
from typing import AsyncIterator, Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from llama_engine.serving.block_manager import cdiv
from llama_engine.text_stream import IncrementalText

from .logprobs import TokenText, shape
from .loop import AsyncSink, EngineLoop, Event, Handle, Overloaded
from .metrics import CONTENT_TYPE, ServerMetrics
from .protocol import (APIError, ChatCompletionRequest, CompletionRequest, error_body,
                       to_sampling)

MAX_PROMPTS = 64
FINISH = {"length": "length", "stop": "stop", "cancelled": "abort", "error": "error"}


@dataclass
class ServerState:
    """What the handlers share: the engine thread, the tokenizer, the served name, limits."""

    loop: EngineLoop
    tokenizer: object
    model_name: str
    metrics: ServerMetrics
    max_input_len: int
    max_output_len: int
    max_seq_len: int
    num_blocks: int
    block_size: int
    created: int = 0
    token_text: Optional[TokenText] = None

    @staticmethod
    def limits(llm) -> dict:
        """What the handlers check requests against, from an LLMEngine."""
        b, bm = llm.engine.config.build, llm.block_manager
        return {"max_input_len": b.max_input_len, "max_output_len": b.max_output_len,
                "max_seq_len": b.max_seq_len, "num_blocks": bm.num_blocks,
                "block_size": bm.block_size}

    @classmethod
    def create(cls, loop, tokenizer, model_name: str, metrics, limits: dict) -> "ServerState":
        """``loop``: an EngineLoop, or remote.RemoteLoop in the HTTP process; ``metrics``:
        ServerMetrics or its remote view."""
        return cls(loop, tokenizer, model_name, metrics, created=int(time.time()),
                   token_text=TokenText(tokenizer), **limits)

    @classmethod
    def for_engine(cls, loop: EngineLoop, tokenizer, model_name: str,
                   metrics: ServerMetrics) -> "ServerState":
        return cls.create(loop, tokenizer, model_name, metrics, cls.limits(loop.llm))


def create_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="llama_engine OpenAI-compatible server")
    app.state.server = state

    @app.exception_handler(APIError)
    async def _api_error(_, e: APIError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_, e: RequestValidationError):
        errs = e.errors()
        first = errs[0] if errs else {}
        if first.get("type") == "json_invalid":
            return JSONResponse(error_body(f"malformed JSON body: {first.get('msg', '')}"),
                                status_code=400)
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        param = ".".join(loc) or None
        return JSONResponse(error_body(f"{param or 'body'}: {first.get('msg', 'invalid')}",
                                       param=param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_, e: StarletteHTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(str(e.detail), kind), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def _internal(_, e: Exception):
        return JSONResponse(error_body(f"{type(e).__name__}: {e}", "internal_error"),
                            status_code=500)

    @app.get("/health")
    async def health():
        if not state.loop.alive:
            return JSONResponse({"status": "engine stopped"}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        text = state.metrics.render()
        if inspect.isawaitable(text):       # the engine's process renders it (remote.py)
            text = await text
        return Response(text, media_type=CONTENT_TYPE)

    def model_card() -> dict:
        return {"id": state.model_name, "object": "model", "created": state.created,
                "owned_by": "llama_engine", "max_model_len": state.max_seq_len}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str):
        _check_model(state, name)
        return model_card()

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        _check_model(state, req.model)
        req.check_supported()
        prompts = _prompts(req.prompt)
        ids = [_prompt_ids(state, p) for p in prompts]
        echo = [p if isinstance(p, str) else state.tokenizer.decode(p)
                for p in prompts] if req.echo else None
        return await _serve(state, request, req, ids, "completion", req.logprobs,
                            req.max_tokens, echo)

    @app.post("/v1/chat/completions")
    async def chat(req: ChatCompletionRequest, request: Request):
        _check_model(state, req.model)
        req.check_supported()
        tok = state.tokenizer
        if not tok.has_chat_template:
            raise APIError(400, f"the tokenizer ({tok.source}) has no chat template",
                           param="messages")
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        try:
            ids = tok.encode_chat(messages)
        except Exception as e:  # noqa: BLE001 - a template may reject a conversation
            raise APIError(400, f"chat template: {e}", param="messages") from e
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None \
            else req.max_tokens
        return await _serve(state, request, req, [ids], "chat", logprobs, max_tokens)

    return app


def _check_model(state: ServerState, name: Optional[str]) -> None:
    if name is not None and name != state.model_name:
        raise APIError(404, f"model {name!r} does not exist; this server serves "
                       f"{state.model_name!r}", param="model", code="model_not_found")


def _prompts(prompt) -> list:
    """A completions ``prompt`` as a list of prompts (text or token ids): OpenAI takes one
    or a list of several."""
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        if len(prompt) > MAX_PROMPTS:
            raise APIError(400, f"at most {MAX_PROMPTS} prompts per request", param="prompt")
        return list(prompt)
    return [prompt]


def _prompt_ids(state: ServerState, prompt) -> list[int]:
    if isinstance(prompt, str):
        return state.tokenizer.encode(prompt, add_bos=True)
    vocab = state.tokenizer.vocab_size
    if any(not 0 <= t < vocab for t in prompt):
        raise APIError(400, f"prompt token ids must be in [0, {vocab})", param="prompt")
    return list(prompt)


def _max_tokens(state: ServerState, n_prompt: int, max_tokens: Optional[int],
                param: str) -> int:
    if n_prompt == 0:
        raise APIError(400, "the prompt is empty", param=param)
    if n_prompt > state.max_input_len:
        raise APIError(413, f"the prompt has {n_prompt} tokens; this engine takes at most "
                       f"{state.max_input_len}", param=param, code="context_length_exceeded")
    room = min(state.max_output_len, state.max_seq_len - n_prompt)
    if max_tokens is None:
        max_tokens = room
    if max_tokens <= 0:
        raise APIError(400, f"max_tokens must be at least 1, got {max_tokens}",
                       param="max_tokens")
    if max_tokens > room:
        raise APIError(400, f"max_tokens {max_tokens} is over what is left for this prompt "
                       f"({room}: max_output_len {state.max_output_len}, max_seq_len "
                       f"{state.max_seq_len})", param="max_tokens",
                       code="context_length_exceeded")
    if cdiv(n_prompt + max_tokens - 1, state.block_size) > state.num_blocks:
        raise APIError(400, "prompt + max_tokens is larger than the whole KV cache",
                       param="max_tokens", code="context_length_exceeded")
    return max_tokens


async def _serve(state: ServerState, request: Request, req, prompts: list, kind: str,
                 logprobs: Optional[int], max_tokens: Optional[int],
                 echo: Optional[list] = None):
    """``prompts``: token ids of each prompt; choice ``j * n + i`` is prompt j's i-th."""
    stops = req.stop_strings()
    limits = [_max_tokens(state, len(ids), max_tokens,
                          "messages" if kind == "chat" else "prompt") for ids in prompts]
    samplings = [to_sampling(req, logprobs, i) for i in range(req.n)]
    stop_ids = tuple(req.stop_token_ids) + (() if req.ignore_eos
                                            else tuple(state.tokenizer.end_ids))
    events: asyncio.Queue = asyncio.Queue()
    sink = AsyncSink(asyncio.get_running_loop())
    handles = [Handle(ids, s, limit, stop_ids, j * req.n + i, sink, events)
               for j, (ids, limit) in enumerate(zip(prompts, limits))
               for i, s in enumerate(samplings)]
    echo = [e for e in echo for _ in range(req.n)] if echo else None
    try:
        state.loop.submit(handles)
    except Overloaded as e:
        raise APIError(503, f"server overloaded: {e}", "server_overloaded",
                       code="overloaded") from e
    run = _Run(state, handles, events, stops, kind, sum(map(len, prompts)),
               logprobs is not None, echo)
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return StreamingResponse(run.sse(include_usage), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})
    return JSONResponse(await run.collect(request))


class _Run:
    """One HTTP request's engine requests (n per prompt), turned into OpenAI responses."""

    def __init__(self, state: ServerState, handles: list, events: asyncio.Queue, stops: list,
                 kind: str, num_prompt: int, logprobs: bool = False,
                 echo: Optional[list] = None):
        self.state, self.handles, self.events, self.kind = state, handles, events, kind
        self.streams = [IncrementalText(state.tokenizer, stops, offsets=logprobs)
                        for _ in handles]
        self.echo = echo            # per choice: its prompt's text (completions' echo)
        # With log-probs, per choice: (id, log-prob, top) of every token received, and the
        # entries (with their text offsets) already released with their text.
        self.lp_in: Optional[list] = [[] for _ in handles] if logprobs else None
        self.lp_out: Optional[list] = [[] for _ in handles] if logprobs else None
        self.counts = [0] * len(handles)
        self.reasons: list[Optional[str]] = [None] * len(handles)
        self.num_prompt = num_prompt
        self.id = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())

    def cancel_all(self) -> None:
        for h in self.handles:
            self.state.loop.cancel(h)

    def apply(self, ev: Event) -> tuple[str, Optional[str], Optional[list]]:
        """An event -> (new text, finish reason if this choice ended now, the log-prob
        entries going out with that text: None without log-probs)."""
        i = ev.index
        if self.reasons[i] is not None:
            return "", None, None        # already ended (a stop string): later news is moot
        if ev.error:
            self.reasons[i] = "error"
            if ev.finish_reason == "overloaded":     # the engine's process refused it
                raise APIError(503, ev.error, "server_overloaded", code="overloaded")
            raise APIError(400, ev.error, code="request_refused")
        s = self.streams[i]
        self.counts[i] += len(ev.token_ids)
        if self.lp_in is not None:
            self.lp_in[i].extend(ev.logprobs or ())
        text = s.push(ev.token_ids)
        if s.stopped:
            self.state.loop.cancel(self.handles[i])
            self.reasons[i] = "stop"
        elif ev.finished:
            text += s.finish()
            self.reasons[i] = FINISH.get(ev.finish_reason, ev.finish_reason)
        return text, self.reasons[i], self._released(i)

    def _released(self, i: int) -> Optional[list]:
        if self.lp_in is None:
            return None
        s, start = self.streams[i], len(self.lp_out[i])
        end = min(s.released(start), len(self.lp_in[i]))
        new = [(*self.lp_in[i][k], s.offsets[k]) for k in range(start, end)]
        self.lp_out[i].extend(new)
        return new

    def _logprobs(self, entries: Optional[list]):
        return shape(self.kind, entries, self.state.token_text)

    @property
    def pending(self) -> bool:
        return any(r is None for r in self.reasons)

    def usage(self) -> dict:
        done = sum(self.counts)
        return {"prompt_tokens": self.num_prompt, "completion_tokens": done,
                "total_tokens": self.num_prompt + done}

    async def collect(self, request: Request) -> dict:
        try:
            while self.pending:
                try:
                    ev = await asyncio.wait_for(self.events.get(), 1.0)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        self.cancel_all()
                        return {}
                    continue
                self.apply(ev)
        finally:
            self.cancel_all()
        texts = [s.output_text for s in self.streams]
        lps = [self._logprobs(self.lp_out[i] if self.lp_out else None)
               for i in range(len(texts))]
        if self.kind == "chat":
            choices = [{"index": i, "message": {"role": "assistant", "content": t},
                        "logprobs": lps[i], "finish_reason": r}
                       for i, (t, r) in enumerate(zip(texts, self.reasons))]
            obj = "chat.completion"
        else:
            choices = [{"index": i, "text": (self.echo[i] if self.echo else "") + t,
                        "logprobs": lps[i],
                        "finish_reason": r}
                       for i, (t, r) in enumerate(zip(texts, self.reasons))]
            obj = "text_completion"
        return {"id": self.id, "object": obj, "created": self.created,
                "model": self.state.model_name, "choices": choices, "usage": self.usage()}

    def _chunk(self, i: int, text: Optional[str], reason: Optional[str],
               role: bool = False, lps: Optional[list] = None) -> str:
        lp = self._logprobs(lps) if lps is not None else None
        if self.kind == "chat":
            delta = {"role": "assistant", "content": ""} if role else (
                {"content": text} if text else {})
            choice = {"index": i, "delta": delta, "logprobs": lp, "finish_reason": reason}
            obj = "chat.completion.chunk"
        else:
            choice = {"index": i, "text": text or "", "logprobs": lp, "finish_reason": reason}
            obj = "text_completion"
        return self._sse({"id": self.id, "object": obj, "created": self.created,
                          "model": self.state.model_name, "choices": [choice]})

    @staticmethod
    def _sse(obj: dict) -> str:
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    async def sse(self, include_usage: bool) -> AsyncIterator[str]:
        try:
            if self.kind == "chat":
                for i in range(len(self.handles)):
                    yield self._chunk(i, None, None, role=True)
            elif self.echo:
                for i in range(len(self.handles)):
                    yield self._chunk(i, self.echo[i], None)
            while self.pending:
                # Everything queued goes out in one write: a busy event loop sends fewer,
                # fuller chunks instead of falling behind.
                evs = [await self.events.get()]
                while not self.events.empty():
                    evs.append(self.events.get_nowait())
                out = []
                for ev in evs:
                    try:
                        text, reason, lps = self.apply(ev)
                    except APIError as e:
                        out.append(self._sse(e.body()))
                        continue
                    if text or reason or lps:
                        out.append(self._chunk(ev.index, text, reason, lps=lps))
                if out:
                    yield "".join(out)
            if include_usage:
                yield self._sse({"id": self.id, "object": "chat.completion.chunk"
                                 if self.kind == "chat" else "text_completion",
                                 "created": self.created, "model": self.state.model_name,
                                 "choices": [], "usage": self.usage()})
            yield "data: [DONE]\n\n"
        finally:                          # also when the client went away mid-stream
            self.cancel_all()
