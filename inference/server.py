"""A small HTTP server for a trained model: an OpenAI-style ``POST /v1/completions`` (streaming too) and
``GET /health``, standard library only (``http.server``), on localhost unless told otherwise.

Continuous batching: one decode loop (a thread) owns the model and a ``DecodeBatch``. Between two steps it admits the
requests that arrived (each prompt prefilled alone, its state stacked onto the batch's), then every running request
gets one token from the same step; a request leaves the batch when it has its ``max_tokens``, meets a stop string, or
its client goes away. Handler threads only parse, check and answer: a request's text reaches them through a queue.

Requests::

    POST /v1/completions  {"prompt": str, "max_tokens": int = 16, "temperature": float = 1.0, "top_p": float = 1.0,
                           "top_k": int | null, "stop": str | [str] | null, "stream": bool = false, "seed": int = 0,
                           "model": str (ignored)}
    -> {"id", "object": "text_completion", "created", "model",
        "choices": [{"text", "index": 0, "finish_reason": "stop" | "length", "logprobs": null}],
        "usage": {"prompt_tokens", "completion_tokens", "total_tokens"}}
    stream: server-sent events, ``data: {...}`` (the same object, each choice's ``text`` a new piece,
    ``finish_reason`` null until the last chunk), then ``data: [DONE]``.

A bad request gets a 4xx and ``{"error": {"message": one line, "type": ...}}``: 400 for malformed JSON, an unknown
field, a value of the wrong type or out of range, a prompt longer than ``max_prompt_tokens`` or ``max_tokens`` over
the server's limit; 404 / 405 for other paths and methods; 429 while ``max_concurrent`` requests are running.
"""

from __future__ import annotations

import itertools
import json
import queue
import signal
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch

from chimera.inference.generate import DecodeBatch, Sampling, TextStream, sampling_problem


@dataclass(frozen=True)
class Limits:
    max_tokens: int = 256  # new tokens per request, at most
    max_concurrent: int = 8  # requests running (or waiting to join the batch) at once
    max_prompt_tokens: int = 1024


class BadRequest(Exception):
    def __init__(self, message: str, status: int = 400, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.kind = status, kind


# ---- a request, checked ---------------------------------------------------------------------------------------------

FIELDS = {  # name: (accepted types, default)
    "prompt": ((str,), None),
    "max_tokens": ((int,), 16),
    "temperature": ((int, float), 1.0),
    "top_p": ((int, float), 1.0),
    "top_k": ((int, type(None)), None),
    "stop": ((str, list, type(None)), None),
    "stream": ((bool,), False),
    "seed": ((int,), 0),
    "model": ((str,), None),
}
TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true or false", list: "a list",
              type(None): "null"}


def parse_request(body: bytes, tokenizer, limits: Limits) -> dict:
    """A completion request's body -> its settings (``prompt_ids`` encoded), or ``BadRequest`` naming what is wrong."""
    try:
        request = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadRequest(f"the body is not valid JSON ({e})") from None
    if not isinstance(request, dict):
        raise BadRequest("the body must be a JSON object, e.g. {\"prompt\": \"def \", \"max_tokens\": 16}")
    unknown = sorted(set(request) - set(FIELDS))
    if unknown:
        raise BadRequest(f"unknown field {unknown[0]!r}; this server takes {', '.join(FIELDS)}")
    settings = {}
    for name, (kinds, default) in FIELDS.items():
        if name not in request:
            settings[name] = default
            continue
        value = request[name]
        wrong_bool = isinstance(value, bool) and bool not in kinds
        if not isinstance(value, kinds) or wrong_bool:
            want = " or ".join(TYPE_NAMES[k] for k in kinds if not (k is int and float in kinds))
            raise BadRequest(f"{name} must be {want}, not {json.dumps(value)}")
        settings[name] = value
    if settings["prompt"] is None:
        raise BadRequest("prompt is missing: give the text to continue, e.g. {\"prompt\": \"def \"}")
    stop = settings["stop"]
    stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not all(isinstance(s, str) for s in stop) or len(stop) > 4:
        raise BadRequest("stop must be a string or a list of at most 4 strings")
    settings["stop"] = tuple(stop)
    problem = sampling_problem(settings["max_tokens"], settings["temperature"], settings["top_k"], settings["top_p"],
                               {"max_new_tokens": "max_tokens"})
    if problem:
        raise BadRequest(problem)
    if settings["max_tokens"] > limits.max_tokens:
        raise BadRequest(f"max_tokens {settings['max_tokens']}: over this server's limit of {limits.max_tokens}")
    ids = tokenizer.encode(settings["prompt"]).tolist()
    if not ids:
        raise BadRequest("prompt is empty: give at least one character")
    if len(ids) > limits.max_prompt_tokens:
        raise BadRequest(f"the prompt has {len(ids)} tokens, over this server's limit of {limits.max_prompt_tokens}")
    settings["prompt_ids"] = ids
    return settings


# ---- the decode loop ------------------------------------------------------------------------------------------------

@dataclass(eq=False)
class Job:
    """A request in the decode loop: its settings, its text so far, where its pieces go."""

    settings: dict
    stream: TextStream
    out: queue.Queue = field(default_factory=queue.Queue)  # text pieces, then ("done", finish_reason) or an error
    cancelled: threading.Event = field(default_factory=threading.Event)


class DecodeLoop:
    """The thread that owns the model: admits waiting jobs between steps, steps every running one together."""

    def __init__(self, model, tokenizer, limits: Limits):
        self.model, self.tokenizer = model, tokenizer
        self.batch = DecodeBatch(model, limits.max_prompt_tokens + limits.max_tokens, tokenizer.vocab_size)
        self.waiting: queue.Queue[Job] = queue.Queue()
        self.stopping = threading.Event()
        self.peak_rows = 0  # the most requests one step has served
        self.steps = 0
        self.thread = threading.Thread(target=self._run, name="chimera-decode", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(timeout=30)

    def submit(self, job: Job) -> None:
        self.waiting.put(job)

    def _run(self) -> None:
        with torch.inference_mode():
            while not self.stopping.is_set():
                try:
                    self._admit(block=not self.batch.rows)
                    if self.batch.rows:
                        self._step()
                except Exception as e:  # a bug: every running request hears of it, the loop goes on
                    for row in self.batch.rows:
                        row.tag.out.put(("error", f"generation failed: {type(e).__name__}: {e}"))
                    self.batch = DecodeBatch(self.model, self.batch.max_len, self.batch.vocab_limit)

    def _admit(self, block: bool) -> None:
        while True:
            try:
                job = self.waiting.get(timeout=0.05) if block else self.waiting.get_nowait()
            except queue.Empty:
                return
            block = False
            if job.cancelled.is_set():
                continue
            s = job.settings
            try:
                self.batch.admit(torch.tensor([s["prompt_ids"]], dtype=torch.long), s["max_tokens"],
                                 Sampling(float(s["temperature"]), s["top_k"], float(s["top_p"])), [s["seed"]],
                                 tags=[job])
            except Exception as e:  # a bug in prefill: this request hears of it
                job.out.put(("error", f"prefill failed: {type(e).__name__}: {e}"))

    def _step(self) -> None:
        self.peak_rows = max(self.peak_rows, len(self.batch.rows))
        self.steps += 1
        leaving = []
        for row, token in self.batch.step():
            job = row.tag
            piece = job.stream.push(token)
            if piece:
                job.out.put(piece)
            if job.stream.stopped or job.cancelled.is_set() or len(row.tokens) >= row.max_new_tokens:
                rest = job.stream.finish()
                if rest:
                    job.out.put(rest)
                job.out.put(("done", "stop" if job.stream.stopped else "length"))
                leaving.append(row)
        self.batch.retire([r for r in leaving if not r.finished])


# ---- HTTP -----------------------------------------------------------------------------------------------------------

class CompletionServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address, model, tokenizer, limits: Limits = Limits(), model_name: str = "chimera"):
        self.tokenizer, self.limits, self.model_name = tokenizer, limits, model_name
        self.loop = DecodeLoop(model, tokenizer, limits)
        self.running = 0  # requests admitted and not yet answered
        self.lock = threading.Lock()
        self.ids = itertools.count(1)
        super().__init__(address, CompletionHandler)
        self.loop.start()

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def close(self) -> None:
        """Stop serving (from another thread than ``serve_forever``'s) and stop the decode loop."""
        self.shutdown()
        self.server_close()
        self.loop.stop()

    def reserve(self) -> None:
        with self.lock:
            if self.running >= self.limits.max_concurrent:
                raise BadRequest(f"too many requests: {self.running} running, this server's limit is "
                                 f"{self.limits.max_concurrent}; retry shortly", 429, "rate_limit_error")
            self.running += 1

    def release(self) -> None:
        with self.lock:
            self.running -= 1


class CompletionHandler(BaseHTTPRequestHandler):
    server: CompletionServer
    protocol_version = "HTTP/1.0"  # one request per connection; a stream ends with the connection

    def log_message(self, format, *args):  # quiet: no line per request on stderr
        pass

    def do_GET(self):
        if self.path != "/health":
            return self._error(BadRequest(f"no such path {self.path!r}: GET /health or POST /v1/completions", 404,
                                          "not_found"))
        loop = self.server.loop
        self._json(200, {"status": "ok", "model": self.server.model_name, "running": self.server.running,
                         "steps": loop.steps, "peak_batch": loop.peak_rows})

    def do_POST(self):
        if self.path != "/v1/completions":
            return self._error(BadRequest(f"no such path {self.path!r}: POST /v1/completions", 404, "not_found"))
        try:
            length = int(self.headers.get("Content-Length") or 0)
            settings = parse_request(self.rfile.read(length), self.server.tokenizer, self.server.limits)
            self.server.reserve()
        except BadRequest as e:
            return self._error(e)
        try:
            self._complete(settings)
        finally:
            self.server.release()

    def do_PUT(self):
        self._error(BadRequest(f"{self.command} is not served: POST /v1/completions or GET /health", 405,
                               "method_not_allowed"))

    do_DELETE = do_PATCH = do_PUT

    def _complete(self, settings: dict) -> None:
        job = Job(settings, TextStream(self.server.tokenizer.decode, settings["stop"]))
        head = {"id": f"cmpl-{next(self.server.ids)}", "object": "text_completion", "created": int(time.time()),
                "model": self.server.model_name}
        self.server.loop.submit(job)
        if settings["stream"]:
            return self._stream(job, head)
        pieces, outcome = [], None
        while outcome is None:
            item = job.out.get()
            if isinstance(item, str):
                pieces.append(item)
            else:
                outcome = item
        if outcome[0] == "error":
            return self._json(500, {"error": {"message": outcome[1], "type": "server_error"}})
        prompt_tokens, made = len(settings["prompt_ids"]), len(job.stream.tokens)
        self._json(200, {**head, "choices": [{"text": "".join(pieces), "index": 0, "finish_reason": outcome[1],
                                              "logprobs": None}],
                         "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": made,
                                   "total_tokens": prompt_tokens + made}})

    def _stream(self, job: Job, head: dict) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()

        def event(text: str, finish_reason):
            choice = {"text": text, "index": 0, "finish_reason": finish_reason, "logprobs": None}
            self.wfile.write(f"data: {json.dumps({**head, 'choices': [choice]})}\n\n".encode())
            self.wfile.flush()

        try:
            while True:
                item = job.out.get()
                if isinstance(item, str):
                    event(item, None)
                elif item[0] == "error":
                    self.wfile.write(f"data: {json.dumps({'error': {'message': item[1]}})}\n\n".encode())
                    break
                else:
                    event("", item[1])
                    break
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):  # the client went away: its row leaves the batch
            job.cancelled.set()

    def _json(self, status: int, obj: dict) -> None:
        body = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _error(self, e: BadRequest) -> None:
        message = " ".join(str(e).split())  # one line
        self._json(e.status, {"error": {"message": message, "type": e.kind}})


def stop_on_signals(server: CompletionServer) -> dict:
    """SIGINT (Ctrl-C) and SIGTERM (a service manager's stop) end ``serve_forever`` through ``shutdown``, whatever
    handlers the libraries imported before installed; returns the handlers replaced."""
    def stop(signum, frame):
        threading.Thread(target=server.shutdown, name="chimera-stop", daemon=True).start()

    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, stop)
    return previous


def serve(model, tokenizer, host: str, port: int, limits: Limits, model_name: str, announce=print) -> None:
    """Serve until interrupted (Ctrl-C)."""
    server = CompletionServer((host, port), model, tokenizer, limits, model_name)
    announce(f"chimera: serving {model_name} on {server.url} (POST /v1/completions, GET /health); Ctrl-C stops")
    previous = stop_on_signals(server)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        server.server_close()
        server.loop.stop()
