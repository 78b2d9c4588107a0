"""The engine thread: the one place ``LLMEngine.step()`` runs, so the HTTP event loop never
waits on a model step.

Requests and cancellations arrive through a thread-safe queue (``submit`` / ``cancel`` may be
called from any thread); each step's tokens go back to the request's ``asyncio.Queue`` through
its event loop's ``call_soon_threadsafe``. A request whose client went away is cancelled here,
between steps, which frees its KV blocks. More outstanding requests than ``max_queue`` are
refused at once (``Overloaded``) instead of queueing without bound. If a step raises, every
request in flight is finished with that error and the loop goes on with new requests.

Two knobs trade the HTTP side's CPU against the engine's. Both threads share the GIL, and the
HTTP side's work grows with every streamed token, so the engine thread, which waits on the GPU
without the GIL, must get it back quickly: ``gil_switch_s`` lowers the interpreter's switch
interval (5 ms by default, a long stall for a step of ~30 ms) while the loop runs.
``stream_interval`` (TensorRT-LLM's option of that name) posts a request's tokens every that
many steps instead of every step, and always its first token and its end, so TTFT is
unchanged and the HTTP side wakes ``stream_interval`` times less per request.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import sys
import threading
from dataclasses import dataclass, field
from typing import Optional

from llama_engine.config import ConfigError

log = logging.getLogger(__name__)


class Overloaded(Exception):
    """More requests outstanding than the server's queue depth."""


@dataclass
class Event:
    """One step's news for one request."""

    index: int                 # which of the caller's n choices
    token_ids: list
    finished: bool = False
    finish_reason: Optional[str] = None   # "length", "stop", "cancelled", "error"
    error: Optional[str] = None
    num_prompt_tokens: int = 0
    # Per new token when the request asked for log-probs: (id, log-prob, [(id, log-prob)]
    # top N or None).
    logprobs: Optional[list] = None


class AsyncSink:
    """Where a handle's events go when the HTTP side is an event loop of this process: each
    handle's ``asyncio.Queue``, one wake-up of that loop per engine step."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop

    def post(self, items: list) -> None:
        try:
            self.loop.call_soon_threadsafe(_deliver, items)
        except RuntimeError:      # the event loop is closed: nobody listens any more
            pass


def _deliver(items: list) -> None:
    for h, ev in items:
        h.events.put_nowait(ev)


@dataclass
class Handle:
    """A submitted request as the HTTP side sees it. ``sink`` takes its events (AsyncSink, or
    the pipe to the HTTP process, remote.py); ``events``: its queue there, when local."""

    prompt_ids: list
    sampling: object
    max_tokens: int
    stop_ids: tuple
    index: int
    sink: object
    events: Optional[asyncio.Queue] = None
    request_id: Optional[int] = None      # the LLMEngine's id, set by the engine thread
    cancelled: bool = False
    done: bool = False
    num_sent: int = 0                     # output tokens already posted
    held: Optional[Event] = None          # tokens waiting for the stream interval
    held_steps: int = 0
    key: Optional[int] = None             # the HTTP process's name for it (remote.py)

    def post(self, ev: Event) -> None:
        self.sink.post([(self, ev)])


class EngineLoop:
    """Drives ``llm`` (an ``LLMEngine``) on its own thread; ``metrics``: a ServerMetrics."""

    def __init__(self, llm, metrics=None, max_queue: int = 4096, stream_interval: int = 1,
                 gil_switch_s: Optional[float] = 2e-4):
        if stream_interval < 1:
            raise ConfigError(f"stream_interval must be at least 1, got {stream_interval}")
        self.llm = llm
        self.metrics = metrics
        self.max_queue = max_queue
        self.stream_interval = stream_interval
        self.gil_switch_s = gil_switch_s
        self._old_switch: Optional[float] = None
        self._inbox: queue.Queue = queue.Queue()
        self._active: dict[int, Handle] = {}
        self._outstanding = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self.num_steps = 0
        self._must_step = False

    # -- any thread --------------------------------------------------------------------------
    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def start(self) -> "EngineLoop":
        if self.gil_switch_s is not None and sys.getswitchinterval() > self.gil_switch_s:
            self._old_switch = sys.getswitchinterval()
            sys.setswitchinterval(self.gil_switch_s)
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._inbox.put(None)
        self._thread.join(timeout)
        if self._old_switch is not None:
            sys.setswitchinterval(self._old_switch)
            self._old_switch = None

    @property
    def num_outstanding(self) -> int:
        return self._outstanding

    def submit(self, handles: list[Handle]) -> None:
        """Queue ``handles`` (all or none: Overloaded when they would exceed ``max_queue``)."""
        with self._lock:
            if self._outstanding + len(handles) > self.max_queue:
                raise Overloaded(f"{self._outstanding} requests outstanding; the server's "
                                 f"queue depth is {self.max_queue}")
            self._outstanding += len(handles)
        for h in handles:
            self._inbox.put(("add", h))

    def cancel(self, handle: Handle) -> None:
        if not handle.done and not handle.cancelled:
            handle.cancelled = True
            self._inbox.put(("cancel", handle))

    # -- the engine thread -------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            self._drain(block=not (self.llm.has_unfinished() or self._must_step))
            if self._stop.is_set():
                break
            if not (self.llm.has_unfinished() or self._must_step):
                continue
            # A request refused by add_request, or cancelled, is reported by the next step
            # even when nothing else runs: hence a step after any add or cancel.
            self._must_step = False
            try:
                outs = self.llm.step()
            except Exception as e:  # noqa: BLE001 - fail the requests, keep serving
                log.exception("engine step failed")
                self._fail_all(f"engine step failed: {type(e).__name__}: {e}")
                continue
            self.num_steps += 1
            new_tokens = 0
            posts: dict = {}          # sink -> [(handle, event)]: one wake-up per step
            for out in outs:
                h = self._active.get(out.request_id)
                new_tokens += len(out.new_token_ids)
                if h is None:
                    continue
                reason = out.finish_reason.value if out.finished else None
                if out.finished:
                    self._retire(h)
                    if self.metrics is not None:
                        self.metrics.observe_finished(out.sequence, reason)
                ev = self._hold(h, self._event(h, out, reason))
                if ev is not None:
                    posts.setdefault(h.sink, []).append((h, ev))
            for sink, items in posts.items():
                sink.post(items)
            if self.metrics is not None:
                self.metrics.observe_step(self.llm, new_tokens)

    @staticmethod
    def _event(h: Handle, out, reason: Optional[str]) -> Event:
        new = list(out.new_token_ids)
        lps = None
        seq = out.sequence
        if getattr(h.sampling, "logprobs", None) is not None:
            # new_token_ids are output_ids[num_sent:num_sent + len(new)] (RequestOutput);
            # the sequence keeps a log-prob for each output id.
            # (A token without one, which no path makes today, reads as -inf rather than
            # stopping this thread.)
            start, n = h.num_sent, len(new)
            vals = seq.logprobs[start:start + n]
            tops = seq.top_logprobs[start:start + n]
            vals += [float("-inf")] * (n - len(vals))
            tops += [None] * (n - len(tops))
            lps = list(zip(new, vals, tops))
        h.num_sent += len(new)
        return Event(h.index, new, out.finished, reason, out.error, seq.num_prompt_tokens, lps)

    def _hold(self, h: Handle, ev: Event) -> Optional[Event]:
        """``ev``, merged with what ``h`` holds, when it is due (stream interval reached, the
        request's first tokens, its end); else None, holding it."""
        if h.held is not None:
            held = h.held
            held.token_ids += ev.token_ids
            if ev.logprobs is not None:
                held.logprobs = (held.logprobs or []) + ev.logprobs
            held.finished, held.finish_reason, held.error = ev.finished, ev.finish_reason, \
                ev.error
            ev = held
        h.held_steps += 1
        first = h.num_sent == len(ev.token_ids)        # nothing was posted before
        if ev.finished or first or h.held_steps >= self.stream_interval:
            h.held, h.held_steps = None, 0
            return ev
        h.held = ev
        return None

    def _drain(self, block: bool) -> None:
        try:
            item = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while item is not None:
            kind, h = item
            if kind == "add":
                self._add(h)
            elif h.request_id is not None and h.request_id in self._active:
                self.llm.cancel(h.request_id)     # reported finished by the next step
                self._must_step = True
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _add(self, h: Handle) -> None:
        if h.cancelled:
            self._done(h)
            h.post(Event(h.index, [], True, "cancelled"))
            return
        try:
            rid = self.llm.add_request(h.prompt_ids, h.sampling, max_tokens=h.max_tokens,
                                       stop_ids=h.stop_ids)
        except (ConfigError, ValueError, TypeError) as e:
            self._done(h)
            h.post(Event(h.index, [], True, "error", str(e)))
            return
        h.request_id = rid
        self._active[rid] = h
        self._must_step = True

    def _retire(self, h: Handle) -> None:
        self._active.pop(h.request_id, None)
        self._done(h)

    def _done(self, h: Handle) -> None:
        h.done = True
        with self._lock:
            self._outstanding -= 1

    def _fail_all(self, message: str) -> None:
        for rid, h in list(self._active.items()):
            self.llm.cancel(rid)
            self._retire(h)
            h.post(Event(h.index, [], True, "error", message))
        try:                      # the cancelled requests' outputs carry nothing new
            self.llm.step()
        except Exception:  # noqa: BLE001
            log.exception("engine step after a failure failed too")
