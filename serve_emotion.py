"""A local HTTP endpoint for the emotion classifier in the Hugging Face Inference API's
image-classification format, with request batching. Standard library only (http.server).

    python serve_emotion.py [--model PATH] [--port 8000]
    curl --data-binary @face.jpg http://127.0.0.1:8000/

    POST /       the image bytes as the body, or JSON {"inputs": "<base64 image>",
                 "parameters": {"top_k": 5, "function_to_apply": "softmax"}}
                 -> 200 [{"label": ..., "score": ...}, ...] sorted by score; with "faces": true,
                 [{"box": [x, y, w, h], "predictions": [...]}, ...] per face found (faces/)
    GET /health  the model, labels, device, dtype and the batching counters
    errors       {"error": "..."} with 400, 404, 405, 408, 411, 413 (or 500 for a failed forward pass)

How one request flows:

    request thread   read the body (bounded in size and time) -> parse it -> decode and preprocess
                     the image -> put (pixel_values, future) on the batcher's queue -> wait
    batcher thread   take the first waiting request, gather more for up to max_wait_ms (at most
                     max_batch_size in all), run ONE forward pass, hand each caller its own logits
                     (serving/batcher.py)
    request thread   scores (softmax / sigmoid / none) and top_k on its own row -> the JSON answer

A bad image is refused before it reaches the queue, so it fails only its own request.
"""
from __future__ import annotations

import argparse
import base64
import binascii
import io
import json
import signal
import socket
import sys
import threading
import time
import traceback
import warnings
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

import torch
from PIL import Image, UnidentifiedImageError

from common.state_dict import CheckpointError
from embedded import EMOTION_VIT
from faces.crops import face_crops
from serving.batcher import Batcher
from vit.classifier import DTYPES, FUNCTIONS, ImageClassifier, apply_function, rank
from vit.preprocess import ImageError, load_image

LINGER_S = 1.0  # after an error answer, how long to swallow what the client still sends (see linger)


class HTTPError(Exception):
    """A request we refuse: the status and the message sent back as {"error": message}."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


# ---- the request's parameters: one row per name -----------------------------------------------------
@dataclass(frozen=True)
class Parameter:
    default: object
    valid: Callable[[object], bool]
    expected: str                      # said in the 400 answer when `valid` refuses a value


def _positive_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


# The Inference API's image-classification parameters. A new option is one more row here.
PARAMETERS = {
    "top_k": Parameter(5, _positive_int, "an integer >= 1 (capped at the number of labels)"),
    "function_to_apply": Parameter("softmax", lambda v: v in FUNCTIONS, f"one of {', '.join(FUNCTIONS)}"),
    "faces": Parameter(False, lambda v: isinstance(v, bool), "true or false (classify each face crop)"),
}
TOP_LEVEL_KEYS = ("inputs", "parameters", "options")  # "options" (wait_for_model, use_cache): ignored here


def parse_parameters(given) -> dict:
    """The request's "parameters" object -> every parameter's value, defaults filled in."""
    given = {} if given is None else given
    if not isinstance(given, dict):
        raise HTTPError(400, f'"parameters" must be a JSON object, not {type(given).__name__}')
    unknown = sorted(set(given) - set(PARAMETERS))
    if unknown:
        raise HTTPError(400, f"unknown parameter(s) {', '.join(unknown)}; known: {', '.join(PARAMETERS)}")
    values = {}
    for name, parameter in PARAMETERS.items():
        value = given.get(name, parameter.default)
        if not parameter.valid(value):
            raise HTTPError(400, f"parameters.{name} = {json.dumps(value)}: must be {parameter.expected}")
        values[name] = value
    return values


def parse_body(body: bytes, content_type: str) -> tuple[bytes, dict]:
    """A raw-image or JSON body -> (image bytes, parameters). JSON is told by its Content-Type or by
    its first byte ("{" begins no image format), so `curl -d @request.json` works too."""
    if content_type.split(";")[0].strip().lower() != "application/json" and body.lstrip()[:1] != b"{":
        return body, parse_parameters(None)
    try:
        doc = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise HTTPError(400, f"body is not valid JSON ({e})") from e
    if not isinstance(doc, dict):
        raise HTTPError(400, f"JSON body must be an object with \"inputs\", not {type(doc).__name__}")
    unknown = sorted(set(doc) - set(TOP_LEVEL_KEYS))
    if unknown:
        raise HTTPError(400, f"unknown key(s) {', '.join(unknown)}; known: {', '.join(TOP_LEVEL_KEYS)}")
    inputs = doc.get("inputs")
    if not isinstance(inputs, str):
        raise HTTPError(400, '"inputs" must be a string: the image bytes, base64-encoded')
    if inputs.startswith(("http://", "https://")):
        raise HTTPError(400, '"inputs" is a URL; this server fetches nothing: send the image bytes base64-encoded')
    if inputs.startswith("data:") and "," in inputs:  # a data URL: data:image/png;base64,....
        inputs = inputs.split(",", 1)[1]
    try:
        image = base64.b64decode("".join(inputs.split()), validate=True)  # line breaks of `base64` allowed
    except (binascii.Error, ValueError) as e:
        raise HTTPError(400, f'"inputs" is not valid base64 ({e})') from e
    return image, parse_parameters(doc.get("parameters"))


def decode_image(data: bytes) -> Image.Image:
    """Image bytes -> RGB image. Refuses images over Pillow's pixel limit (decompression bombs) from the
    header alone, before decoding: Pillow itself only warns below twice its limit."""
    try:
        with Image.open(io.BytesIO(data)) as probe:
            width, height = probe.size
    except Image.DecompressionBombError as e:
        raise ImageError(f"request body: image too large ({e})") from e
    except UnidentifiedImageError:
        raise ImageError(f"request body: not an image in any format Pillow reads ({len(data)} bytes "
                         f"beginning {data[:8]!r})") from None
    except Exception:   # a known format but a broken file; load_image below says what is wrong
        width = height = 0
    limit = Image.MAX_IMAGE_PIXELS
    if limit and width * height > limit:
        raise ImageError(f"request body: image too large ({width}x{height} = {width * height} pixels, "
                         f"over Pillow's limit of {limit}: a possible decompression bomb)")
    try:
        return load_image(data, name="request body")
    except ImageError:
        raise
    except Exception as e:  # a malformed file can trip an unexpected error deep in a decoder
        raise ImageError(f"request body: not a readable image ({type(e).__name__}: {e})") from e


# ---- HTTP -----------------------------------------------------------------------------------------------
class Handler(BaseHTTPRequestHandler):
    # HTTP/1.1 so that `Expect: 100-continue` (curl, for large bodies) is answered at once; every
    # answer still closes the connection, which keeps shutdown simple (no idle keep-alive sockets).
    protocol_version = "HTTP/1.1"
    server: "EmotionServer"

    def setup(self) -> None:
        self.timeout = self.server.read_timeout_s   # per socket read while reading the request line and headers
        super().setup()

    def handle(self) -> None:
        self.errored = False
        super().handle()
        if self.errored:
            self.linger()

    # -- routes --
    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/health":
            self.send_json(200, self.server.health())
        elif path == "/":
            self.send_json(405, {"error": "GET / is not allowed: POST an image to /"}, [("Allow", "POST")])
        else:
            self.send_json(404, {"error": f"no route {path}: POST / for predictions, GET /health"})

    def do_POST(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/health":
            self.send_json(405, {"error": "POST /health is not allowed: GET it"}, [("Allow", "GET")])
            return
        if path != "/":
            self.send_json(404, {"error": f"no route {path}: POST / for predictions, GET /health"})
            return
        try:
            body = self.read_body()
            image_bytes, parameters = parse_body(body, self.headers.get("Content-Type", ""))
            predictions = self.server.predict(decode_image(image_bytes), parameters)
        except HTTPError as e:
            self.send_json(e.status, {"error": e.message})
        except ImageError as e:
            self.send_json(400, {"error": str(e)})
        except Exception as e:  # a failed forward pass: the server's fault, not the request's
            traceback.print_exc()
            self.send_json(500, {"error": f"prediction failed ({type(e).__name__}: {e})"})
        else:
            self.send_json(200, predictions)

    def method_not_allowed(self) -> None:
        allow = "GET" if self.path.split("?", 1)[0] == "/health" else "POST"
        self.send_json(405, {"error": f"{self.command} is not allowed here; use {allow}"}, [("Allow", allow)])

    do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = method_not_allowed

    # -- reading the body --
    def content_length(self) -> int:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            raise HTTPError(411, "chunked bodies are not supported: send a Content-Length")
        values = set(self.headers.get_all("Content-Length") or [])
        if not values:
            raise HTTPError(411, "a Content-Length header is required")
        if len(values) > 1:
            raise HTTPError(400, f"conflicting Content-Length headers: {', '.join(sorted(values))}")
        raw = values.pop()
        if not raw.strip().isdigit():
            raise HTTPError(400, f"Content-Length {raw!r} is not a number of bytes")
        length = int(raw)
        if length > self.server.max_body_bytes:
            raise HTTPError(413, f"body of {length} bytes is over the limit of {self.server.max_body_bytes} "
                                 "bytes (--max_body_mb)")
        if length == 0:
            raise HTTPError(400, "empty body: send the image bytes, or JSON with \"inputs\"")
        return length

    def read_body(self) -> bytes:
        """Exactly Content-Length bytes, all within read_timeout_s (a slow sender cannot hold the thread)."""
        length = self.content_length()
        timeout = self.server.read_timeout_s
        deadline, chunks, received = time.monotonic() + timeout, [], 0
        while received < length:
            remaining = deadline - time.monotonic()
            try:
                if remaining <= 0:
                    raise TimeoutError
                self.connection.settimeout(remaining)
                chunk = self.rfile.read1(min(length - received, 1 << 16))
            except TimeoutError:
                raise HTTPError(408, f"body not received within {timeout:g} s ({received} of {length} bytes); "
                                     "check the Content-Length") from None
            if not chunk:
                raise HTTPError(400, f"body ended after {received} of the {length} bytes its Content-Length "
                                     "announced")
            chunks.append(chunk)
            received += len(chunk)
        return b"".join(chunks)

    def handle_expect_100(self) -> bool:
        """Refuse an oversized or unsized body before the client sends it."""
        if self.command == "POST":
            try:
                self.content_length()
            except HTTPError as e:
                self.send_json(e.status, {"error": e.message})
                return False
        return super().handle_expect_100()

    # -- answering --
    def send_json(self, status: int, payload, headers=()) -> None:
        body = json.dumps(payload).encode()
        self.errored = status >= 400
        self.close_connection = True
        if getattr(self, "request_version", None) == "HTTP/0.9":  # a garbage request line parses as HTTP/0.9,
            self.request_version = "HTTP/1.0"                     # which has no status line: give it one
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Connection", "close")
            for name, value in headers:
                self.send_header(name, value)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)
        except OSError:  # the client has gone; nothing to tell it
            pass

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own errors (bad request line, unsupported method, ...) as JSON too."""
        self.send_json(code, {"error": message or HTTPStatus(code).phrase})

    def linger(self) -> None:
        """After an error answer, read and drop what the client still sends (up to LINGER_S), so that
        closing with unread bytes (a lying Content-Length, an oversized body) does not reset the
        connection before the client has read our answer."""
        try:
            self.connection.shutdown(socket.SHUT_WR)
            deadline = time.monotonic() + LINGER_S
            while (remaining := deadline - time.monotonic()) > 0:
                self.connection.settimeout(remaining)
                if not self.connection.recv(1 << 16):
                    break
        except OSError:
            pass

    def log_message(self, format: str, *args) -> None:
        if not self.server.quiet:
            super().log_message(format, *args)


class EmotionServer(ThreadingHTTPServer):
    daemon_threads = False   # request threads are joined by server_close(): requests in flight finish
    block_on_close = True
    request_queue_size = 128  # listen backlog; socketserver's 5 overflows under 16 concurrent clients and the
                              # dropped connections wait a 1 s SYN retransmission

    def __init__(self, classifier: ImageClassifier, *, host: str = "127.0.0.1", port: int = 0,
                 max_batch_size: int = 16, max_wait_ms: float = 5, max_body_mb: float = 10,
                 read_timeout_s: float = 10, quiet: bool = False):
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.classifier = classifier
        self.max_batch_size, self.max_wait_ms = max_batch_size, max_wait_ms
        self.max_body_bytes = int(max_body_mb * 1024 * 1024)
        self.read_timeout_s, self.quiet = read_timeout_s, quiet
        super().__init__((host, port), Handler)
        self.batcher = Batcher(classifier.logits, max_batch_size=max_batch_size, max_wait_ms=max_wait_ms)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    def predict(self, image: Image.Image, parameters: dict) -> list[dict]:
        try:   # with "faces": each face crop is one more row for the batcher
            regions = face_crops(image) if parameters["faces"] else [(None, image)]
        except ValueError as e:                                           # e.g. smaller than the detector's window
            raise ImageError(f"request body: {e}") from e
        futures = [self.batcher.submit(self.classifier.pixel_values([crop])[0]) for _, crop in regions]  # (3, H, W)
        ranked = [rank(apply_function(f.result()[None], parameters["function_to_apply"])[0],   # logits (num_labels,)
                       self.classifier.labels, top_k=parameters["top_k"]) for f in futures]
        if not parameters["faces"]:
            return ranked[0]
        return [{"box": list(box), "predictions": r} for (box, _), r in zip(regions, ranked)]

    def health(self) -> dict:
        c = self.classifier
        return {"status": "ok", "model": c.path, "layout": c.layout, "labels": c.labels, "device": c.device,
                "dtype": c.dtype_name, "quantize": c.quantize, "max_batch_size": self.max_batch_size,
                "max_wait_ms": self.max_wait_ms, "cpu_threads": torch.get_num_threads(),
                "batching": self.batcher.stats()}

    def close(self) -> None:
        """After shutdown(): stop listening, wait for the requests in flight, then stop the batcher."""
        self.server_close()
        self.batcher.close()


# ---- command line -------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(EMOTION_VIT),
                   help="a transformers ViT folder, a timm folder/file or a bare .safetensors (default: the "
                        "embedded demo model, trained on synthetic cartoon faces only: embedded/emotion_vit)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8000, help="0 picks a free port (the address is printed)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    p.add_argument("--quantize", default=None, choices=["int8"], help="dynamic int8 Linear layers (CPU)")
    p.add_argument("--max_batch_size", type=int, default=16, help="images per forward pass at most")
    p.add_argument("--max_wait_ms", type=float, default=5, help="how long a batch waits for more requests")
    p.add_argument("--max_body_mb", type=float, default=10, help="larger request bodies get 413")
    p.add_argument("--read_timeout_s", type=float, default=10, help="a request body must arrive within this")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch's own work (default: 1 with --device cuda, torch's default on "
                        "the CPU). On a GPU the CPU side of a request is small tensor work, and torch's pool of "
                        "one OpenMP thread per core, entered by 16 request threads at once, halved the batched "
                        "throughput on a 16-core H100 machine (bench/serve.py)")
    p.add_argument("--quiet", action="store_true", help="no access log on stderr")
    args = p.parse_args(argv)
    for flag, value, low in (("--max_batch_size", args.max_batch_size, 1), ("--port", args.port, 0)):
        if value < low:
            p.error(f"{flag} {value}: must be at least {low}")
    if args.port > 65535:
        p.error(f"--port {args.port}: must be at most 65535")
    for flag, value in (("--max_body_mb", args.max_body_mb), ("--read_timeout_s", args.read_timeout_s)):
        if value <= 0:
            p.error(f"{flag} {value}: must be positive")
    if args.threads is not None and args.threads < 1:
        p.error(f"--threads {args.threads}: must be at least 1")
    if args.max_wait_ms < 0:
        p.error(f"--max_wait_ms {args.max_wait_ms}: must be zero or more")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    threads = args.threads or (1 if args.device.startswith("cuda") else None)   # None: torch's default
    if threads:
        torch.set_num_threads(threads)
    try:
        classifier = ImageClassifier(args.model, device=args.device, dtype=args.dtype, quantize=args.quantize)
    except (CheckpointError, ValueError, OSError) as e:
        print(f"error: --model {args.model}: {e}", file=sys.stderr)
        return 2
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)  # decode_image refuses those
    try:
        server = EmotionServer(classifier, host=args.host, port=args.port, max_batch_size=args.max_batch_size,
                               max_wait_ms=args.max_wait_ms, max_body_mb=args.max_body_mb,
                               read_timeout_s=args.read_timeout_s, quiet=args.quiet)
    except OSError as e:
        print(f"error: --host {args.host} --port {args.port}: cannot listen ({e.strerror or e})", file=sys.stderr)
        return 2

    def stop(signum, frame):  # serve_forever() runs in this thread: shutdown() must be called from another
        print(f"{signal.Signals(signum).name}: finishing requests in flight, then exiting "
              "(send it again to exit at once)", file=sys.stderr)
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_DFL)
        threading.Thread(target=server.shutdown).start()

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    print(f"serving {args.model} on {server.url}/ (POST an image to /, GET /health)", flush=True)
    server.serve_forever()
    server.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
