"""serve_emotion.py over real HTTP on loopback: the same scores as predict_emotion.py, batching under
concurrency, every bad request answered with its status while the server keeps serving, bounded
resources (image size, decodes at once, connections, slow clients, memory after a burst), multipart
uploads, and a clean shutdown on SIGTERM that finishes the request in flight and no more."""
import base64
import http.client
import io
import json
import os
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
from PIL import Image

import predict_emotion
import serve_emotion
from serve_emotion import EmotionServer
from serving.batcher import Batcher
from serving.body import HTTPError, content_length, read_body
from vit.classifier import ImageClassifier
from common.images import load_image

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


def strict_json(data: bytes):
    """json.loads that refuses NaN and Infinity, which are not JSON (Python's parser accepts them)."""
    def refuse(name):
        raise AssertionError(f"{name} in a JSON answer")
    return json.loads(data, parse_constant=refuse)


def form_body(files: dict, data: dict | None = None, boundary: str = "0f4a6c1e9b7d2a3c8e5f1b0d6a9c4e27"):
    """The body and Content-Type that `requests.post(url, files=files, data=data)` sends, byte for byte
    (requests 2.x builds it with urllib3's encode_multipart_formdata; its boundary is 32 random hex
    digits): the data fields first, then the files. `files` maps a field name to (filename, bytes) or
    (filename, bytes, content type); requests writes no Content-Type line without the third."""
    body = b""
    for name, value in (data or {}).items():
        body += f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
    for name, (filename, content, *content_type) in files.items():
        body += f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'.encode()
        body += b"".join(f"Content-Type: {t}\r\n".encode() for t in content_type) + b"\r\n" + content + b"\r\n"
    body += f"--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def form(files: dict, data: dict | None = None, **options) -> bytes:
    """A raw multipart request, as form_body builds it."""
    body, content_type = form_body(files, data, **options)
    return message(body, headers=(f"Content-Type: {content_type}",))


def eps_image() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 10, 10)).save(buffer, "EPS")   # Pillow writes EPS without Ghostscript
    return buffer.getvalue()


JSON = ("Content-Type: application/json",)
FORM = "Content-Type: multipart/form-data; boundary=XyZ"
DEEP = b"[" * 100_000 + b"]" * 100_000
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
    "decompression bomb": ([message(png_header(20000, 20000))], {}, 413, "too large"),
    "over Pillow's pixel limit": ([message(png_header(10000, 10000))], {}, 413, "too large"),
    "over --max_image_pixels": ([message(png_header(6000, 5000))], {}, 413,
                                "6000x5000 = 30000000 pixels, over the limit of 25000000 pixels (--max_image_pixels)"),
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
    "JSON nested 10^5 deep": ([message(b'{"inputs": ' + DEEP + b"}", headers=JSON)], {}, 400, "nested too deeply"),
    "JSON parameters nested 10^5 deep": ([message(b'{"inputs": "", "parameters": ' + DEEP + b"}")], {}, 400, "nested"),
    "NaN in JSON": ([message(b'{"inputs": NaN}', headers=JSON)], {}, 400, "NaN is not a JSON value"),
    "EPS image (needs Ghostscript)": ([message(eps_image())], {}, 400,
                                      "EPS images are not read here (Pillow would run Ghostscript"),
    "slow headers": ([b"POST / HTTP/1.1\r\n"] + [b"X-Slow: 1\r\n"] * 5, {"pause": 0.25}, 408,
                     "request line and headers not received within 1 s"),
    "multipart bomb": ([form({"image": ("bomb.png", png_header(10000, 10000))})], {}, 413, "too large"),
    "multipart EPS": ([form({"image": ("a.eps", eps_image())})], {}, 400, "EPS"),
    "multipart without a boundary": ([message(b"--x\r\n", headers=("Content-Type: multipart/form-data",))], {}, 400,
                                     "no boundary parameter"),
    "multipart boundary not in the body": ([message(JPEG, headers=(FORM,))], {}, 400, "'XyZ' of the Content-Type"),
    "multipart cut short": ([message(form_body({"f": ("a.jpg", JPEG)}, boundary="XyZ")[0][:-9], headers=(FORM,))],
                            {}, 400, "cut short"),
    "multipart no file part": ([form({}, {"parameters": "{}"})], {}, 400,
                               "expected one file part holding the image, found 0"),
    "multipart two file parts": ([form({"a": ("a.jpg", JPEG), "b": ("b.jpg", JPEG)})], {}, 400, "found 2 (a, b)"),
    "multipart unknown field": ([form({"f": ("a.jpg", JPEG)}, {"top_k": "3"})], {}, 400, "unknown field(s) top_k"),
    "multipart bad parameters": ([form({"f": ("a.jpg", JPEG)}, {"parameters": "{top_k: 3}"})], {}, 400,
                                 'form field "parameters" is not valid JSON'),
    "multipart parameter refused": ([form({"f": ("a.jpg", JPEG)}, {"parameters": '{"top_k": 0}'})], {}, 400, "top_k"),
    "multipart part without a disposition": (
        [message(b"--XyZ\r\nContent-Type: image/jpeg\r\n\r\n" + JPEG + b"\r\n--XyZ--\r\n", headers=(FORM,))],
        {}, 400, "no 'Content-Disposition: form-data'"),
    "multipart part without a blank line": (
        [message(b"--XyZ\r\nContent-Disposition: form-data; name=a\r\n--XyZ--\r\n", headers=(FORM,))],
        {}, 400, "no blank line after its header lines"),
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


# ---- reading the body, without a socket (serving/body.py) --------------------------------------------------
def headers(*lines: str):
    """Request headers parsed as http.server parses them."""
    return http.client.parse_headers(io.BytesIO("".join(f"{line}\r\n" for line in lines).encode() + b"\r\n"))


@pytest.mark.parametrize("lines, status, word", [
    ((), 411, "Content-Length header is required"),
    (("Transfer-Encoding: chunked", "Content-Length: 5"), 411, "chunked"),
    (("Content-Length: 5", "Content-Length: 6"), 400, "conflicting Content-Length headers: 5, 6"),
    (("Content-Length: -5",), 400, "'-5' is not a number"),
    (("Content-Length: 1e3",), 400, "'1e3' is not a number"),
    (("Content-Length: 1001",), 413, "body of 1001 bytes is over the limit of 1000 bytes (--max_body_mb)"),
    (("Content-Length: 0",), 400, "empty body"),
])
def test_content_length_refusals(lines, status, word):
    with pytest.raises(HTTPError) as refused:
        content_length(headers(*lines), max_bytes=1000)
    assert refused.value.status == status and word in refused.value.message


def test_content_length_accepts_repeats_that_agree_and_the_limit_itself():
    assert content_length(headers("Content-Length: 1000", "Content-Length: 1000"), max_bytes=1000) == 1000
    assert content_length(headers("Content-Length: 7"), max_bytes=1000) == 7


class TrickleThenTimeout(io.RawIOBase):
    """A connection that gives `data` a few bytes at a time, then hits its deadline."""

    def __init__(self, data: bytes, chunk: int):
        self.data, self.chunk = data, chunk

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        if not self.data:
            raise TimeoutError("deadline passed")
        n = min(self.chunk, len(buffer), len(self.data))
        buffer[:n], self.data = self.data[:n], self.data[n:]
        return n


def test_read_body_reads_exactly_the_announced_bytes():
    stream = io.BufferedReader(io.BytesIO(JPEG + b"next request"))
    assert read_body(stream, len(JPEG), timeout_s=1.0) == JPEG
    assert stream.read() == b"next request"                      # nothing past the body was taken
    big = bytes(range(256)) * 1000                               # more than one 64 KiB chunk
    assert read_body(io.BufferedReader(TrickleThenTimeout(big, 1000)), len(big), timeout_s=1.0) == big


def test_read_body_short_or_slow_is_named():
    with pytest.raises(HTTPError) as short:
        read_body(io.BufferedReader(io.BytesIO(b"12345")), 8, timeout_s=1.0)
    assert short.value.status == 400 and "ended after 5 of the 8 bytes" in short.value.message
    with pytest.raises(HTTPError) as slow:
        read_body(io.BufferedReader(TrickleThenTimeout(b"x" * 30, 10)), 1000, timeout_s=2.5)
    assert slow.value.status == 408 and "within 2.5 s (30 of 1000 bytes)" in slow.value.message


# ---- multipart/form-data ----------------------------------------------------------------------------------
def test_form_body_is_what_requests_sends():
    """Pinned to what requests 2.34.2 (urllib3 2.7.0) sent for files={"image": ("face.jpg", data,
    "image/jpeg")}, data={"parameters": '{"top_k": 3}'} with urllib3's boundary fixed to "b0undary"."""
    body, content_type = form_body({"image": ("face.jpg", b"\x00\r\n--x\xff", "image/jpeg")},
                                   {"parameters": '{"top_k": 3}'}, boundary="b0undary")
    assert content_type == "multipart/form-data; boundary=b0undary"
    assert body == (b'--b0undary\r\nContent-Disposition: form-data; name="parameters"\r\n\r\n{"top_k": 3}\r\n'
                    b'--b0undary\r\nContent-Disposition: form-data; name="image"; filename="face.jpg"\r\n'
                    b'Content-Type: image/jpeg\r\n\r\n\x00\r\n--x\xff\r\n--b0undary--\r\n')
    assert form_body({"file": ("photo.png", b"DATA")}, boundary="b0undary")[0] == (   # files={"file": open(...)}
        b'--b0undary\r\nContent-Disposition: form-data; name="file"; filename="photo.png"\r\n\r\nDATA\r\n'
        b"--b0undary--\r\n")


def test_multipart_upload_equals_raw_body(server, classifier):
    expected = classifier.predict([load_image(JPEG)], top_k=3, function_to_apply="sigmoid")[0]
    for files, data in [({"image": ("face.jpg", JPEG, "image/jpeg")}, {"parameters": json.dumps(
                            {"top_k": 3, "function_to_apply": "sigmoid"})}),
                        ({"file": ("face.jpg", JPEG)}, {"parameters": '{"top_k": 3, "function_to_apply": "sigmoid"}'})]:
        body, content_type = form_body(files, data)
        status, got = request(server, body=body, content_type=content_type)
        assert status == 200, got
        assert_same(got, expected)
    body, content_type = form_body({"upload": ("x", JPEG, "application/octet-stream")})   # no parameters: defaults
    status, got = request(server, body=body, content_type=content_type)
    assert status == 200 and len(got) == 5


# ---- bounded resources ------------------------------------------------------------------------------------------
def test_non_finite_scores_are_a_500_never_bare_nan(server, monkeypatch):
    for logit in (float("nan"), float("inf")):
        monkeypatch.setattr(server.batcher, "forward", lambda x, v=logit: torch.full((len(x), 7), v))
        for function in ("softmax", "none"):
            conn = http.client.HTTPConnection(*server.server_address[:2], timeout=30)
            conn.request("POST", "/", body=as_json(JPEG, function_to_apply=function))
            response = conn.getresponse()
            status, payload = response.status, strict_json(response.read())
            conn.close()
            assert status == 500 and "non-finite score (NaN or infinity)" in payload["error"], payload
    monkeypatch.undo()
    assert request(server, body=JPEG)[0] == 200


def test_decodes_at_once_bounded_by_the_cores(server, monkeypatch):
    running, most, lock = [0], [0], threading.Lock()
    decode = serve_emotion.decode_image

    def counting(*args, **kwargs):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(0.2)
        try:
            return decode(*args, **kwargs)
        finally:
            with lock:
                running[0] -= 1
    monkeypatch.setattr(serve_emotion, "decode_image", counting)
    monkeypatch.setattr(serve_emotion, "SMALL_IMAGE_PIXELS", 0)    # every image counts as large here
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: request(server, body=JPEG), range(8)))
    assert all(status == 200 for status, _ in answers)
    assert most[0] == min(os.cpu_count(), 8), most       # the others waited for a slot


def test_small_images_do_not_queue_behind_large_ones(server):
    """With every decode slot held (as by a burst of huge uploads), an ordinary photo is still answered;
    a face search, or an image over SMALL_IMAGE_PIXELS, waits for a slot."""
    slots = [server.decode_slots.acquire(timeout=5) for _ in range(os.cpu_count() or 1)]
    try:
        assert all(slots)
        assert request(server, body=JPEG)[0] == 200
        with ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(request, server, body=as_json(JPEG, faces=True))
            time.sleep(0.5)
            assert not waiting.done()                   # queued for a slot
            for _ in slots:
                server.decode_slots.release()
            slots = []
            assert waiting.result(timeout=60)[0] in (200, 400)
    finally:
        for _ in slots:
            server.decode_slots.release()


def test_connections_over_the_limit_get_503(classifier):
    srv = EmotionServer(classifier, port=0, max_connections=2, read_timeout_s=5, quiet=True)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    idle = [socket.create_connection(srv.server_address[:2], timeout=10) for _ in range(2)]
    try:
        deadline = time.monotonic() + 10
        while len(srv.connections) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        for _ in range(2):
            with socket.create_connection(srv.server_address[:2], timeout=10) as extra:
                data = b""
                while chunk := extra.recv(1 << 16):
                    data += chunk
            head, _, body = data.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 503 ") and b"Retry-After: 1" in head, data
            assert "--max_connections" in json.loads(body)["error"]
        assert request(srv, "GET", "/health")[0] == 503             # a client sending its request first
        for sock in idle:
            sock.close()
        deadline = time.monotonic() + 10
        while srv.connections and time.monotonic() < deadline:
            time.sleep(0.01)
        status, health = request(srv, "GET", "/health")
        assert status == 200 and health["connections"]["refused"] == 3
        assert request(srv, body=JPEG)[0] == 200
    finally:
        for sock in idle:
            sock.close()
        srv.shutdown()
        srv.close()
        thread.join()


def start_server(*flags: str) -> tuple[subprocess.Popen, int]:
    """serve_emotion.py as a user runs it, on a free loopback port -> (process, port)."""
    proc = subprocess.Popen([sys.executable, "serve_emotion.py", "--model", str(MODEL), "--port", "0", "--quiet",
                             *flags], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if "http://127.0.0.1:" not in line:
        proc.kill()
        pytest.fail(f"serve_emotion.py did not start: {line}{proc.communicate()[1]}")
    return proc, int(line.split("http://127.0.0.1:")[1].split("/")[0])


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS:"))


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads the server's RSS from /proc")
def test_burst_of_large_images_gives_its_memory_back():
    """8 concurrent 12-megapixel PNGs (36 MB each once decoded): at most one decode per core holds
    memory at a time, and afterwards the server's RSS is back within 100 MB of its level before."""
    buffer = io.BytesIO()
    Image.new("RGB", (4000, 3000), (120, 80, 40)).save(buffer, "PNG")
    big = buffer.getvalue()
    proc, port = start_server()
    try:
        post = lambda body: call(port, body)
        for _ in range(3):
            assert post(JPEG) == 200
        before, peak, done = rss_mb(proc.pid), [0.0], threading.Event()

        def watch():
            while not done.wait(0.01):
                peak[0] = max(peak[0], rss_mb(proc.pid))
        watcher = threading.Thread(target=watch)
        watcher.start()
        with ThreadPoolExecutor(8) as pool:
            statuses = list(pool.map(post, [big] * 8))
        done.set()
        watcher.join()
        after = rss_mb(proc.pid)
        assert statuses == [200] * 8
        slots = min(os.cpu_count(), 8)
        assert peak[0] - before < 100 * slots + 100, (before, peak[0], after)
        assert after - before < 100, (before, peak[0], after)
    finally:
        proc.kill()
        proc.wait()


def call(port: int, body: bytes) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("POST", "/", body=body)
    status = conn.getresponse().status
    conn.close()
    return status


def test_sigterm_exits_within_the_grace_with_stuck_clients():
    """A client still sending its headers is closed at once; a request whose body never completes gets
    --shutdown_grace_s, then is closed unanswered; the process exits 0 within the grace."""
    proc, port = start_server("--shutdown_grace_s", "1", "--read_timeout_s", "60")
    try:
        slow = socket.create_connection(("127.0.0.1", port), timeout=30)
        slow.sendall(b"POST / HTTP/1.1\r\nHost: localhost\r\n")          # the headers never end
        stuck = socket.create_connection(("127.0.0.1", port), timeout=30)
        stuck.sendall(message(JPEG)[:-100])                                # the body never ends
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:           # both accepted; the stuck one in flight (and /health itself)
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            conn.request("GET", "/health")
            connections = json.loads(conn.getresponse().read())["connections"]
            conn.close()
            if connections["open"] == 3 and connections["in_flight"] == 2:
                break
            time.sleep(0.05)
        else:
            pytest.fail(f"connections never reached 3 open, 2 in flight: {connections}")
        start = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert slow.recv(1 << 16) == b""                                   # closed, nothing lost
        assert proc.wait(timeout=30) == 0
        assert time.monotonic() - start < 1 + 4     # the grace, then the interpreter's exit (0.7 s here, unloaded)
        assert stuck.recv(1 << 16) == b""                                  # closed unanswered
        assert "closed 1 connection(s) still open after --shutdown_grace_s 1" in proc.stderr.read()
    finally:
        slow.close()
        stuck.close()
        if proc.poll() is None:
            proc.kill()
        proc.wait()


# ---- the command line and shutdown ------------------------------------------------------------------------------
@pytest.mark.parametrize("flag", ["--max_wait_ms", "--max_body_mb", "--read_timeout_s", "--shutdown_grace_s"])
@pytest.mark.parametrize("value", ["nan", "inf"])
def test_non_finite_flags_refused_by_name(flag, value, capsys):
    with pytest.raises(SystemExit):
        serve_emotion.parse_args([flag, value])
    assert f"{flag} {value}: must be a finite number" in capsys.readouterr().err

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
