"""The HTTP side in a process of its own, so that it never holds the engine's GIL.

In one process the HTTP event loop and the engine thread share one interpreter lock: every
streamed token costs the event loop tens of microseconds of Python (text, JSON, the socket),
and each time the engine thread comes back from the GPU it may wait for the lock. At a
thousand concurrent streams that cost 35% of the throughput on an H100 (docs/perf-notes.md,
run 12). ``HttpProcess`` starts uvicorn and the FastAPI app (app.py, unchanged) in a spawned
process and keeps the engine here; they speak over one ``multiprocessing`` pipe:

* HTTP process -> engine: ``("add", [(key, prompt_ids, sampling, max_tokens, stop_ids,
  index), ...])`` for one HTTP request's choices, ``("cancel", key)``, and
  ``("metrics" | "alive", token)`` questions;
* engine -> HTTP process: ``("events", [(key, index, token_ids, finished, finish_reason,
  error, num_prompt_tokens, logprobs), ...])`` once per engine step (all requests together),
  the answers ``(kind, token, value)``, and ``("stop",)``.

Text, stop strings, SSE chunks and JSON are all made in the HTTP process; the engine thread
only pickles one list per step. The queue depth is enforced in the HTTP process (503 as
before); metrics stay where the engine is and are rendered on request. When either side goes
away the other notices: the HTTP process ends its streams with an error and stops serving, the
engine side cancels what the HTTP process had asked for.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import itertools
import logging
import multiprocessing as mp
import signal
import socket
import threading
from typing import Callable, Optional

from ..config import ConfigError
from .loop import EngineLoop, Event, Handle, Overloaded

log = logging.getLogger(__name__)

READY_TIMEOUT_S = 300.0          # spawning imports torch, fastapi and the tokenizer


def _messages(conn):
    """What arrives on ``conn`` until the other side closes it."""
    while True:
        try:
            yield conn.recv()
        except (EOFError, OSError):
            return


class HttpProcess:
    """serve.py's HTTP server in a spawned process, over ``loop`` (a started EngineLoop).

    ``tokenizer``: ``(function, args)`` that makes the tokenizer in the new process (it is
    loaded there, not pickled); ``limits``: ServerState.limits(llm). ``port`` 0 takes a free
    port (``self.port`` tells which)."""

    def __init__(self, loop: EngineLoop, metrics, tokenizer: tuple, model_name: str,
                 limits: dict, host: str = "127.0.0.1", port: int = 0,
                 max_queue: int = 4096, log_level: str = "warning", backlog: int = 4096):
        self.loop, self.metrics = loop, metrics
        self.handles: dict[int, Handle] = {}
        self._send_lock = threading.Lock()
        ctx = mp.get_context("spawn")    # the engine's process may hold CUDA: never fork it
        self.conn, child = ctx.Pipe()
        spec = {"tokenizer": tokenizer, "model_name": model_name, "limits": limits,
                "host": host, "port": port, "max_queue": max_queue, "log_level": log_level,
                "backlog": backlog}
        self.proc = ctx.Process(target=_child_main, args=(child, spec), name="http-server",
                                daemon=True)
        self.proc.start()
        child.close()
        if not self.conn.poll(READY_TIMEOUT_S):
            self.close()
            raise ConfigError(f"the HTTP process did not start in {READY_TIMEOUT_S:g} s")
        try:
            kind, value = self.conn.recv()
        except EOFError:
            kind, value = "error", f"exit code {self.proc.exitcode}"
        if kind != "ready":
            self.close()
            raise ConfigError(f"the HTTP server could not start: {value}")
        self.port = value
        self.url = f"http://{host}:{self.port}"
        self._pump = threading.Thread(target=self._run, name="http-pipe", daemon=True)
        self._pump.start()

    # -- engine thread ---------------------------------------------------------------------
    def post(self, items: list) -> None:
        """The sink of every remote handle: one pipe message per engine step."""
        batch = []
        for h, ev in items:
            batch.append((h.key, ev.index, ev.token_ids, ev.finished, ev.finish_reason,
                          ev.error, ev.num_prompt_tokens, ev.logprobs))
            if ev.finished:
                self.handles.pop(h.key, None)
        self._send(("events", batch))

    def _send(self, msg) -> None:
        try:
            with self._send_lock:
                self.conn.send(msg)
        except (OSError, ValueError):       # the HTTP process is gone: nobody listens
            pass

    # -- pipe thread -----------------------------------------------------------------------
    def _run(self) -> None:
        for msg in _messages(self.conn):
            kind = msg[0]
            if kind == "add":
                self._add(msg[1])
            elif kind == "cancel":
                h = self.handles.get(msg[1])
                if h is not None:
                    self.loop.cancel(h)
            elif kind == "metrics":
                self._send(("metrics", msg[1], self.metrics.render()))
            elif kind == "alive":
                self._send(("alive", msg[1], self.loop.alive))
        for h in list(self.handles.values()):      # the HTTP process went away
            self.loop.cancel(h)

    def _add(self, specs: list) -> None:
        handles = [Handle(ids, sampling, max_tokens, stop_ids, index, self, key=key)
                   for key, ids, sampling, max_tokens, stop_ids, index in specs]
        for h in handles:
            self.handles[h.key] = h
        try:
            self.loop.submit(handles)
        except Overloaded as e:           # the HTTP process answers 503 for this too
            self.post([(h, Event(h.index, [], True, "overloaded", f"server overloaded: {e}"))
                          for h in handles])

    # -- any thread ------------------------------------------------------------------------
    @property
    def alive(self) -> bool:
        return self.proc.is_alive()

    def close(self, timeout: float = 10.0) -> None:
        """Stop the HTTP process: it is told to, shuts uvicorn down and closes its end."""
        self._send(("stop",))
        self.proc.join(timeout)
        try:
            self.conn.close()
        except OSError:
            pass
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(timeout)


# -- the HTTP process -----------------------------------------------------------------------
class RemoteLoop:
    """What app.py's handlers use of an EngineLoop (``submit``, ``cancel``, ``alive``), in the
    HTTP process, over the pipe to the engine's process."""

    def __init__(self, conn, max_queue: int, on_lost: Callable[[], None] = lambda: None):
        self.conn, self.max_queue, self.on_lost = conn, max_queue, on_lost
        self.handles: dict[int, Handle] = {}
        self._keys = itertools.count()
        self._questions: dict[int, concurrent.futures.Future] = {}
        self._lock = threading.Lock()
        self._connected = True
        self._reader = threading.Thread(target=self._run, name="engine-pipe", daemon=True)

    def start(self) -> "RemoteLoop":
        self._reader.start()
        return self

    @property
    def alive(self) -> bool:
        return self._connected

    @property
    def num_outstanding(self) -> int:
        return len(self.handles)

    def _send(self, msg) -> None:
        with self._lock:
            self.conn.send(msg)

    def submit(self, handles: list[Handle]) -> None:
        if not self._connected:
            raise Overloaded("the engine process has stopped")
        if len(self.handles) + len(handles) > self.max_queue:
            raise Overloaded(f"{len(self.handles)} requests outstanding; the server's queue "
                             f"depth is {self.max_queue}")
        specs = []
        for h in handles:
            h.key = next(self._keys)
            self.handles[h.key] = h
            specs.append((h.key, h.prompt_ids, h.sampling, h.max_tokens, h.stop_ids, h.index))
        self._send(("add", specs))

    def cancel(self, handle: Handle) -> None:
        if not handle.done and not handle.cancelled and self._connected:
            handle.cancelled = True
            self._send(("cancel", handle.key))

    def ask(self, kind: str) -> concurrent.futures.Future:
        """A question for the engine's process ("metrics", "alive")."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        token = id(fut)
        self._questions[token] = fut
        try:
            self._send((kind, token))
        except (OSError, ValueError) as e:
            self._questions.pop(token, None)
            fut.set_exception(RuntimeError(f"the engine process is gone: {e}"))
        return fut

    def _run(self) -> None:
        for msg in _messages(self.conn):
            if msg[0] == "events":
                self._deliver(msg[1])
            elif msg[0] == "stop":
                break
            else:
                fut = self._questions.pop(msg[1], None)
                if fut is not None:
                    fut.set_result(msg[2])
        self._connected = False
        items = [(h, Event(h.index, [], True, "error", "the engine process went away"))
                 for h in self.handles.values()]
        self.handles.clear()
        self._post(items)
        for fut in self._questions.values():
            fut.set_exception(RuntimeError("the engine process went away"))
        self.on_lost()

    def _deliver(self, batch: list) -> None:
        items = []
        for key, index, ids, finished, reason, error, n_prompt, lps in batch:
            h = self.handles.get(key)
            if h is None:
                continue
            if finished:
                del self.handles[key]
                h.done = True
            items.append((h, Event(index, ids, finished, reason, error, n_prompt, lps)))
        self._post(items)

    @staticmethod
    def _post(items: list) -> None:
        by_sink: dict = {}
        for h, ev in items:
            by_sink.setdefault(h.sink, []).append((h, ev))
        for sink, part in by_sink.items():
            sink.post(part)


class RemoteMetrics:
    """``/metrics`` in the HTTP process: the engine's process renders the text."""

    def __init__(self, remote: RemoteLoop, timeout_s: float = 10.0):
        self.remote, self.timeout_s = remote, timeout_s

    async def render(self) -> bytes:
        return await asyncio.wait_for(asyncio.wrap_future(self.remote.ask("metrics")),
                                      self.timeout_s)


def _child_main(conn, spec: dict) -> None:
    # Ctrl-C reaches the whole process group: the engine's process handles it and tells this
    # one to stop over the pipe, so that uvicorn does not shut down on its own first.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        import uvicorn

        class Server(uvicorn.Server):
            @contextlib.contextmanager
            def capture_signals(self):          # uvicorn >= 0.29
                yield

            def install_signal_handlers(self) -> None:   # older uvicorn
                pass

        from .app import ServerState, create_app
        make, args = spec["tokenizer"]
        tokenizer = make(*args)
        server: Optional[Server] = None

        def lost() -> None:
            if server is not None:
                server.should_exit = True
        remote = RemoteLoop(conn, spec["max_queue"], on_lost=lost)
        state = ServerState.create(remote, tokenizer, spec["model_name"], RemoteMetrics(remote),
                                   spec["limits"])
        app = create_app(state)
        sock = socket.socket(socket.AF_INET6 if ":" in spec["host"] else socket.AF_INET,
                             socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((spec["host"], spec["port"]))
        sock.listen(spec["backlog"])      # connections queue from now, before uvicorn runs
        server = Server(uvicorn.Config(app, log_level=spec["log_level"],
                                       backlog=spec["backlog"]))
        remote.start()
        conn.send(("ready", sock.getsockname()[1]))
    except Exception as e:  # noqa: BLE001 - told to the parent, which raises it
        conn.send(("error", f"{type(e).__name__}: {e}"))
        return
    server.run(sockets=[sock])
