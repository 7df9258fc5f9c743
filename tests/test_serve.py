"""serve_emotion.py over real HTTP on loopback: the same scores as predict_emotion.py, batching under
concurrency, every bad request answered with its status while the server keeps serving, and a clean
shutdown on SIGTERM that finishes the request in flight."""
import base64
import http.client
import json
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

import predict_emotion
import serve_emotion
from serve_emotion import EmotionServer
from serving.batcher import Batcher
from vit.classifier import ImageClassifier
from vit.preprocess import load_image

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "tests" / "fixtures" / "vit" / "hf_classifier"
IMAGES = sorted((ROOT / "tests" / "fixtures" / "images").iterdir())
JPEG = (ROOT / "tests" / "fixtures" / "images" / "rgb.jpg").read_bytes()
READ_TIMEOUT_S = 1.0


@pytest.fixture(scope="module")
def classifier():
    return ImageClassifier(MODEL)


@pytest.fixture(scope="module")
def server(classifier):
    # max_wait_ms 20 so that batches surely form on a busy machine; small body limit and read timeout
    # so the 413 and 408 cases are quick.
    srv = EmotionServer(classifier, port=0, max_batch_size=16, max_wait_ms=20, max_body_mb=1,
                        read_timeout_s=READ_TIMEOUT_S, quiet=True)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.close()
    thread.join()


def request(srv, method="POST", path="/", body=None, content_type=None):
    """One request with http.client -> (status, decoded JSON)."""
    conn = http.client.HTTPConnection(*srv.server_address[:2], timeout=30)
    headers = {"Content-Type": content_type} if content_type else {}
    conn.request(method, path, body=body, headers=headers)
    response = conn.getresponse()
    status, payload = response.status, json.loads(response.read())
    conn.close()
    return status, payload


def as_json(image: bytes, **parameters) -> bytes:
    return json.dumps({"inputs": base64.b64encode(image).decode(), "parameters": parameters}).encode()


def assert_same(got: list[dict], expected: list[dict], tol=1e-5):
    assert [g["label"] for g in got] == [e["label"] for e in expected]
    assert max(abs(g["score"] - e["score"]) for g, e in zip(got, expected)) <= tol


# ---- scores ---------------------------------------------------------------------------------------------
def test_scores_equal_predict_emotion(server, capsys):
    assert predict_emotion.main(["--model", str(MODEL), "--top_k", "7", *map(str, IMAGES)]) == 0
    reference = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["image"] for r in reference] == list(map(str, IMAGES))
    for path, ref in zip(IMAGES, reference):
        status, raw = request(server, body=path.read_bytes())                    # raw bytes, top_k 5
        assert status == 200
        assert_same(raw, ref["predictions"][:5])
        status, full = request(server, body=as_json(path.read_bytes(), top_k=7), content_type="application/json")
        assert status == 200
        assert_same(full, ref["predictions"])


@pytest.mark.parametrize("function", ["softmax", "sigmoid", "none"])
def test_parameters_equal_classifier(server, classifier, function):
    expected = classifier.predict([load_image(JPEG)], top_k=3, function_to_apply=function)[0]
    status, got = request(server, body=as_json(JPEG, top_k=3, function_to_apply=function))  # JSON told by "{"
    assert status == 200 and len(got) == 3
    assert_same(got, expected)


def test_base64_with_line_breaks_and_data_url(server, classifier):
    expected = classifier.predict([load_image(JPEG)])[0]
    wrapped = base64.encodebytes(JPEG).decode()                                # 76-column lines, as `base64`
    for inputs in (wrapped, "data:image/jpeg;base64," + base64.b64encode(JPEG).decode()):
        status, got = request(server, body=json.dumps({"inputs": inputs}), content_type="application/json")
        assert status == 200
        assert_same(got, expected)


# ---- batching ---------------------------------------------------------------------------------------------
def test_concurrent_requests_all_correct_and_batched(server, classifier):
    expected = {p: classifier.predict([load_image(p)])[0] for p in IMAGES}
    before = request(server, "GET", "/health")[1]["batching"]
    paths = [IMAGES[i % len(IMAGES)] for i in range(200)]
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda p: request(server, body=p.read_bytes()), paths))
    for path, (status, got) in zip(paths, answers):
        assert status == 200
        assert_same(got, expected[path])
    after = request(server, "GET", "/health")[1]["batching"]
    requests, batches = after["requests"] - before["requests"], after["batches"] - before["batches"]
    assert requests == 200
    assert after["max_batch_size_seen"] > 1 and batches < requests, after   # real batches formed
    assert sum(int(size) * n for size, n in after["histogram"].items()) == after["requests"]


def test_batcher_routes_rows_and_isolates_a_failed_batch():
    def forward(x):                                        # (B, 3, 1, 1) -> (B, 3); fails on a marked image
        if (x < 0).any():
            raise RuntimeError("boom")
        return x.flatten(1) * 2
    batcher = Batcher(forward, max_batch_size=4, max_wait_ms=50)
    futures = [batcher.submit(torch.full((3, 1, 1), float(i))) for i in range(6)]
    assert [f.result(timeout=10)[0].item() for f in futures] == [2.0 * i for i in range(6)]
    bad = batcher.submit(torch.full((3, 1, 1), -1.0))
    with pytest.raises(RuntimeError, match="boom"):
        bad.result(timeout=10)
    assert batcher.submit(torch.ones(3, 1, 1)).result(timeout=10)[0].item() == 2.0
    batcher.close()
    stats = batcher.stats()
    assert stats["max_batch_size_seen"] <= 4 and stats["failed_batches"] == 1 and stats["requests"] == 7


# ---- bad requests -------------------------------------------------------------------------------------------
def png_header(width: int, height: int) -> bytes:
    """A tiny PNG that claims width x height pixels (8-bit grey): enough for Pillow's bomb check."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(bytes(64))) + chunk(b"IEND", b"")


def message(body: bytes = b"", *, method="POST", path="/", headers=(), length: int | None = -1) -> bytes:
    """Raw HTTP/1.1 request bytes; length -1 = the true Content-Length, None = no header."""
    lines = [f"{method} {path} HTTP/1.1", "Host: localhost", *headers]
    if length is not None:
        lines.append(f"Content-Length: {len(body) if length == -1 else length}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def raw_exchange(srv, parts: list[bytes], *, pause: float = 0.0, half_close: bool = False):
    """Send parts (pausing between them), optionally close our side, read the answer to the end."""
    with socket.create_connection(srv.server_address[:2], timeout=30) as sock:
        try:
            for i, part in enumerate(parts):
                if i and pause:
                    time.sleep(pause)
                sock.sendall(part)
            if half_close:
                sock.shutdown(socket.SHUT_WR)
        except OSError:       # the server may answer (413) and stop reading before we finish sending
            pass
        data = b""
        while chunk := sock.recv(1 << 16):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), json.loads(body)


JSON = ("Content-Type: application/json",)
TOO_BIG = 2 * 1024 * 1024  # the test server's limit is 1 MB
BAD = {
    # name: (request parts, options, expected status, a word the error names)
    "not an image": ([message(b"hello world")], {}, 400, "not an image"),
    "truncated image": ([message(JPEG[: len(JPEG) // 2])], {}, 400, "truncated"),
    "bad JSON": ([message(b'{"inputs": "abc', headers=JSON)], {}, 400, "JSON"),
    "JSON not an object": ([message(b"[1, 2]", headers=JSON)], {}, 400, "object"),
    "bad base64": ([message(b'{"inputs": "not base64!!"}')], {}, 400, "base64"),
    "base64 of a non-image": ([message(as_json(b"hello"))], {}, 400, "not an image"),
    "no inputs": ([message(b'{"parameters": {}}')], {}, 400, "inputs"),
    "URL inputs": ([message(b'{"inputs": "https://example.com/a.jpg"}')], {}, 400, "URL"),
    "unknown key": ([message(b'{"inputs": "", "foo": 1}')], {}, 400, "foo"),
    "unknown parameter": ([message(as_json(JPEG, threshold=0.5))], {}, 400, "threshold"),
    "top_k 0": ([message(as_json(JPEG, top_k=0))], {}, 400, "top_k"),
    "top_k a string": ([message(as_json(JPEG, top_k="3"))], {}, 400, "top_k"),
    "top_k a bool": ([message(as_json(JPEG, top_k=True))], {}, 400, "top_k"),
    "function_to_apply unknown": ([message(as_json(JPEG, function_to_apply="relu"))], {}, 400, "function_to_apply"),
    "parameters a list": ([message(b'{"inputs": "", "parameters": [1]}')], {}, 400, "parameters"),
    "decompression bomb": ([message(png_header(20000, 20000))], {}, 400, "too large"),
    "over Pillow's pixel limit": ([message(png_header(10000, 10000))], {}, 400, "too large"),
    "body over the limit, announced": ([message(length=TOO_BIG)], {}, 413, "max_body_mb"),
    "body over the limit, sent": ([message(bytes(TOO_BIG))], {}, 413, "max_body_mb"),
    "empty body": ([message(b"")], {}, 400, "empty"),
    "no Content-Length": ([message(b"", length=None)], {}, 411, "Content-Length"),
    "chunked body": ([message(b"0\r\n\r\n", headers=("Transfer-Encoding: chunked",), length=None)], {}, 411, "chunked"),
    "Content-Length not a number": ([message(b"abc", length=None, headers=("Content-Length: abc",))], {}, 400, "abc"),
    "truncated body": ([message(JPEG, length=len(JPEG) + 500)], {"half_close": True}, 400, "ended after"),
    "slow body": ([message(length=1000), b"x" * 10, b"x" * 10, b"x" * 10], {"pause": 0.4}, 408, "within"),
    "Content-Length longer than the body": ([message(JPEG, length=len(JPEG) + 500)], {}, 408, "within"),
    "Content-Length shorter than the body": ([message(JPEG, length=100)], {}, 400, "image"),
    "unknown path": ([message(JPEG, path="/predict")], {}, 404, "/predict"),
    "GET unknown path": ([message(method="GET", path="/x", length=None)], {}, 404, "/x"),
    "GET /": ([message(method="GET", length=None)], {}, 405, "POST"),
    "PUT /": ([message(JPEG, method="PUT")], {}, 405, "POST"),
    "DELETE /": ([message(method="DELETE", length=None)], {}, 405, "POST"),
    "POST /health": ([message(JPEG, path="/health")], {}, 405, "GET"),
    "invented method": ([message(method="BREW", length=None)], {}, 501, "BREW"),
    "garbage request line": ([b"HELLO\r\n\r\n"], {}, 400, "request"),
}


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.parametrize("name", list(BAD))
def test_bad_request_answered_and_server_keeps_serving(server, name):
    parts, options, expected, word = BAD[name]
    status, payload = raw_exchange(server, parts, **options)
    assert status == expected, payload
    assert word.lower() in payload["error"].lower(), payload
    assert request(server, "GET", "/health")[0] == 200
    assert request(server, body=JPEG)[0] == 200


# ---- the command line and shutdown ------------------------------------------------------------------------------
def test_bad_model_flag_named(capsys, tmp_path):
    assert serve_emotion.main(["--model", str(tmp_path / "missing"), "--port", "0"]) == 2
    assert "--model" in capsys.readouterr().err


def test_threads_flag_sets_and_reports_the_cpu_threads(capsys):
    with pytest.raises(SystemExit):
        serve_emotion.parse_args(["--threads", "0"])
    assert "--threads 0: must be at least 1" in capsys.readouterr().err
    proc = subprocess.Popen([sys.executable, "serve_emotion.py", "--model", str(MODEL), "--port", "0", "--quiet",
                             "--threads", "1"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        port = int(line.split("http://127.0.0.1:")[1].split("/")[0])
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("GET", "/health")
        assert json.loads(conn.getresponse().read())["cpu_threads"] == 1
        conn.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def test_sigterm_finishes_the_request_in_flight():
    proc = subprocess.Popen([sys.executable, "serve_emotion.py", "--model", str(MODEL), "--port", "0", "--quiet"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()          # "serving ... on http://127.0.0.1:PORT/ ..."
        assert "http://127.0.0.1:" in line, (line, proc.stderr.read() if proc.poll() is not None else "")
        port = int(line.split("http://127.0.0.1:")[1].split("/")[0])
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            request_bytes = message(JPEG)
            sock.sendall(request_bytes[:-100])  # the body is half sent: this request is in flight
            time.sleep(1.0)                     # let the server accept it and start reading
            proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 20    # the server stops listening ...
            while time.monotonic() < deadline:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    time.sleep(0.1)
                except OSError:
                    break
            else:
                pytest.fail("still accepting connections 20 s after SIGTERM")
            sock.sendall(request_bytes[-100:])  # ... but answers the request in flight
            data = b""
            while chunk := sock.recv(1 << 16):
                data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), data
        assert len(json.loads(body)) == 5
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
