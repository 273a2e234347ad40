"""The completions server (``chimera.inference.server``) on localhost, in a thread of this process, always shut down:
concurrent requests share decoding steps (continuous batching) and each gets exactly the text it gets alone; streaming
gives the same text; bad requests get a 4xx with a one-line reason, and the server goes on serving."""

import http.client
import json
import threading
import urllib.error
import urllib.request

import pytest
import torch

from chimera.data.tokenizers import ByteTokenizer
from chimera.inference.generate import generate
from chimera.inference.server import CompletionServer, Limits
from helpers import build_model

LIMITS = Limits(max_tokens=48, max_concurrent=6, max_prompt_tokens=40)
TIMEOUT = 60  # seconds, any one request


@pytest.fixture(scope="module")
def model(single_process):
    return build_model("griffin-tiny").eval()


@pytest.fixture(scope="module")
def server(model):
    server = CompletionServer(("127.0.0.1", 0), model, ByteTokenizer(), LIMITS, "griffin-tiny")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.close()
    thread.join(timeout=10)


def post(server, body, raw: bytes | None = None):
    """(status, JSON answer) of POST /v1/completions."""
    data = raw if raw is not None else json.dumps(body).encode()
    request = urllib.request.Request(server.url + "/v1/completions", data=data,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def post_stream(server, body) -> tuple[list[dict], str]:
    """The events of a streamed completion, and the line that ended it."""
    host, port = server.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=TIMEOUT)
    conn.request("POST", "/v1/completions", json.dumps({**body, "stream": True}),
                 {"Content-Type": "application/json"})
    answer = conn.getresponse()
    assert answer.status == 200 and answer.getheader("Content-Type") == "text/event-stream"
    events, last = [], None
    for line in answer:
        line = line.decode().strip()
        if not line:
            continue
        assert line.startswith("data: ")
        last = line
        if line == "data: [DONE]":
            break
        events.append(json.loads(line[len("data: "):]))
    conn.close()
    return events, last


def alone(model, prompt: str, n: int, temperature=0.0, seed=0) -> str:
    """The text ``generate`` gives this prompt by itself (the single-request reference)."""
    ids = torch.tensor([list(prompt.encode())])
    out = generate(model, ids, n, temperature=temperature, top_k=None, top_p=None, vocab_limit=257, seed=seed)
    return ByteTokenizer().decode(out[0, ids.shape[1]:].tolist())


REQUESTS = [
    {"prompt": "def ", "max_tokens": 48, "temperature": 0},
    {"prompt": "import numpy as np\nimport torch\n", "max_tokens": 40, "temperature": 0},
    {"prompt": "x", "max_tokens": 44, "temperature": 0},
    {"prompt": "class Point:\n    def __init__(self", "max_tokens": 36, "temperature": 0},
    {"prompt": "# sampled ", "max_tokens": 32, "temperature": 0.9, "seed": 5},
]


def test_concurrent_requests_each_get_their_single_request_text(server, model):
    answers = [None] * len(REQUESTS)
    start = threading.Barrier(len(REQUESTS))

    def ask(i):
        start.wait()
        answers[i] = post(server, REQUESTS[i])

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(REQUESTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=2 * TIMEOUT)
    for request, (status, answer) in zip(REQUESTS, answers):
        assert status == 200, answer
        (choice,) = answer["choices"]
        expected = alone(model, request["prompt"], request["max_tokens"], request["temperature"],
                         request.get("seed", 0))
        assert choice["text"] == expected and choice["finish_reason"] == "length"
        assert answer["object"] == "text_completion" and answer["id"].startswith("cmpl-")
        assert answer["usage"] == {"prompt_tokens": len(request["prompt"].encode()),
                                   "completion_tokens": request["max_tokens"],
                                   "total_tokens": len(request["prompt"].encode()) + request["max_tokens"]}
    with urllib.request.urlopen(server.url + "/health", timeout=TIMEOUT) as health:
        stats = json.loads(health.read())
    assert stats["status"] == "ok" and stats["peak_batch"] >= 2  # requests shared steps


def test_streaming_gives_the_same_text(server, model):
    body = {"prompt": "for i in range(", "max_tokens": 30, "temperature": 0, "stop": ["\n\n\n"]}
    status, plain = post(server, body)
    assert status == 200
    events, last = post_stream(server, body)
    assert last == "data: [DONE]" and len(events) > 1
    assert "".join(e["choices"][0]["text"] for e in events) == plain["choices"][0]["text"]
    assert [e["choices"][0]["finish_reason"] for e in events][-1] == plain["choices"][0]["finish_reason"]
    assert all(e["choices"][0]["finish_reason"] is None for e in events[:-1])


def test_stop_string_ends_the_text(server, model):
    full = alone(model, "def ", 40)
    stop = full[12:14]
    status, answer = post(server, {"prompt": "def ", "max_tokens": 40, "temperature": 0, "stop": stop})
    assert status == 200
    assert answer["choices"][0] == {"text": full[: full.find(stop)], "index": 0, "finish_reason": "stop",
                                    "logprobs": None}


@pytest.mark.parametrize(("body", "raw", "status", "reason"), [
    ({"prompt": "x", "max_tokens": -1}, None, 400, "max_tokens -1: must be at least 1"),
    ({"prompt": "x" * 41}, None, 400, "the prompt has 41 tokens, over this server's limit of 40"),
    (None, b'{"prompt": "x", "max_tokens": ', 400, "the body is not valid JSON"),
    (None, b'["x"]', 400, "the body must be a JSON object"),
    ({"prompt": "x", "temprature": 0.5}, None, 400, "unknown field 'temprature'"),
    ({"prompt": "x", "temperature": "hot"}, None, 400, 'temperature must be a number, not "hot"'),
    ({"prompt": "x", "max_tokens": True}, None, 400, "max_tokens must be an integer, not true"),
    ({"prompt": "x", "max_tokens": 49}, None, 400, "max_tokens 49: over this server's limit of 48"),
    ({"prompt": "x", "top_p": 0}, None, 400, "top_p 0: must be in (0, 1]"),
    ({"prompt": "x", "top_k": -3}, None, 400, "top_k -3: must be at least 1"),
    ({"prompt": "x", "stop": [1]}, None, 400, "stop must be a string or a list"),
    ({"max_tokens": 4}, None, 400, "prompt is missing"),
    ({"prompt": ""}, None, 400, "prompt is empty"),
])
def test_bad_request_gets_a_4xx_and_the_server_goes_on(server, model, body, raw, status, reason):
    got, answer = post(server, body, raw)
    assert got == status
    message = answer["error"]["message"]
    assert reason in message and "\n" not in message
    ok, good = post(server, {"prompt": "def ", "max_tokens": 8, "temperature": 0})
    assert ok == 200 and good["choices"][0]["text"] == alone(model, "def ", 8)


def test_unknown_path_and_method(server):
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(server.url + "/v1/chat", timeout=TIMEOUT)
    assert e.value.code == 404 and "no such path" in json.loads(e.value.read())["error"]["message"]
    request = urllib.request.Request(server.url + "/v1/completions", data=b"{}", method="PUT")
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(request, timeout=TIMEOUT)
    assert e.value.code == 405


def test_too_many_concurrent_requests_get_429(model):
    server = CompletionServer(("127.0.0.1", 0), model, ByteTokenizer(), Limits(max_tokens=400, max_concurrent=1,
                                                                                max_prompt_tokens=16))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        host, port = server.server_address[:2]
        conn = http.client.HTTPConnection(host, port, timeout=TIMEOUT)
        conn.request("POST", "/v1/completions", json.dumps({"prompt": "a", "max_tokens": 400, "stream": True}))
        answer = conn.getresponse()
        assert answer.readline().startswith(b"data: ")  # the first request is running
        status, busy = post(server, {"prompt": "b", "max_tokens": 2})
        assert status == 429 and "too many requests" in busy["error"]["message"]
        rest = answer.read().decode()
        assert rest.rstrip().endswith("data: [DONE]")
        conn.close()
        status, _ = post(server, {"prompt": "b", "max_tokens": 2})  # served again once the first is done
        assert status == 200
    finally:
        server.close()
        thread.join(timeout=10)
