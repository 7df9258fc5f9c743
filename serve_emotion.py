"""A local HTTP endpoint for the emotion classifier in the Hugging Face Inference API's
image-classification format, with request batching. Standard library only (http.server).

    python serve_emotion.py [--model PATH] [--port 8000]
    curl --data-binary @face.jpg http://127.0.0.1:8000/
    curl -F image=@face.jpg -F 'parameters={"top_k": 3}' http://127.0.0.1:8000/

    POST /       the image bytes as the body, JSON {"inputs": "<base64 image>", "parameters": {"top_k":
                 5, "function_to_apply": "softmax"}}, or a multipart/form-data upload (the image in its
                 file part, "parameters" an optional JSON field; serving/body.py)
                 -> 200 [{"label": ..., "score": ...}, ...] sorted by score; with "faces": true,
                 [{"box": [x, y, w, h], "predictions": [...]}, ...] per face found (faces/)
    GET /health  the model, labels, device, dtype, limits, connection and batching counters
    errors       {"error": "..."} with 400, 404, 405, 408, 411, 413, 503 (or 500 for a failed forward pass)

How one request flows:

    request thread   read the request line and headers, then the body (each bounded in time, the body in
                     size) -> parse it -> in one of the decode slots (one per core): decode the image
                     (its pixel count checked from the header first), find faces, preprocess, close the
                     image -> put (pixel_values, future) on the batcher's queue -> wait
    batcher thread   take the first waiting request, gather more for up to max_wait_ms (at most
                     max_batch_size in all), run ONE forward pass, hand each caller its own logits
                     (serving/batcher.py)
    request thread   scores (softmax / sigmoid / none) and top_k on its own row -> the JSON answer

A bad image is refused before it reaches the queue, so it fails only its own request. What is bounded,
and what happens on SIGTERM, is in docs/reliability.md.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import signal
import socket
import sys
import threading
import time
import traceback
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler

import torch
from PIL import Image

from common.hub_cache import resolve_model
from common.precision import slow_precision_warning
from common.state_dict import CheckpointError
from embedded import EMOTION_VIT
from faces.crops import face_crops
from serving.batcher import Batcher
from serving.body import HTTPError, content_length, parse_body, read_body
from serving.connections import BoundedHTTPServer, DeadlineReader
from serving.memory import release_freed_memory
from vit.classifier import DTYPES, NON_FINITE, ImageClassifier, apply_function, rank
from common.images import ImageError, ImageTooLarge, load_image

LINGER_S = 1.0  # after an error answer, how long to swallow what the client still sends (see linger)
MAX_IMAGE_PIXELS = 25_000_000   # --max_image_pixels: a 24-megapixel photo (6000x4000, 6016x4016) and some room
MAX_DETECT_SIDE = 1280          # --max_detect_side: faces are found on a copy this size, boxes mapped back
MAX_CONNECTIONS = 64            # --max_connections
SHUTDOWN_GRACE_S = 10.0         # --shutdown_grace_s
LARGE_IMAGE_PIXELS = 4_000_000  # after closing a larger image, freed memory goes back to the OS (serving/memory.py)
# Images up to this size (by their header) decode without waiting for a decode slot when no face search is
# asked: at most 12 MB of pixels each and --max_connections requests at once, so memory stays bounded,
# and a burst of huge uploads cannot make ordinary photos queue behind it (bench/serve.py --case hostile).
SMALL_IMAGE_PIXELS = 4_000_000


def header_pixels(data: bytes) -> int:
    """The pixel count an image's header claims, read without decoding; 0 when the header is unreadable
    (`decode_image` then says why, inside a decode slot)."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.width * image.height
    except Exception:   # any unreadable header: decode_image names the problem
        return 0


def decode_image(data: bytes, max_pixels: int | None) -> Image.Image:
    """Image bytes -> RGB image. The format and the pixel count are checked from the header before any
    pixel is decoded (vit/preprocess.py): a small PNG can claim 400 megapixels."""
    try:
        return load_image(data, name="request body", max_pixels=max_pixels)
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
        super().setup()
        self.rfile.close()    # StreamRequestHandler's reader, replaced by one that keeps a deadline
        self.reader = DeadlineReader(self.connection)
        self.reader.deadline = time.monotonic() + self.server.read_timeout_s   # for the request line and headers
        self.rfile = io.BufferedReader(self.reader)

    def handle(self) -> None:
        self.errored = self.answered = False
        self.requestline, self.request_version, self.command = "", "HTTP/1.1", None   # until a request line is read
        super().handle()
        if self.reader.timed_out and not self.answered:     # the request line or headers came too slowly
            self.send_json(408, {"error": f"request line and headers not received within "
                                          f"{self.server.read_timeout_s:g} s (--read_timeout_s)"})
        if self.errored:
            self.linger()

    def parse_request(self) -> bool:
        """http.server's reading of the request line and headers. Once they are in, the request is in
        flight: a shutdown waits for it (up to --shutdown_grace_s) instead of closing it at once."""
        if not super().parse_request():
            return False
        self.server.request_started(self.connection)
        return True

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
            length = content_length(self.headers, max_bytes=self.server.max_body_bytes)
            self.reader.deadline = time.monotonic() + self.server.read_timeout_s   # the whole body within it
            body = read_body(self.rfile, length, timeout_s=self.server.read_timeout_s)
            image_bytes, parameters = parse_body(body, self.headers.get("Content-Type", ""))
            del body      # a multipart body's image is a copy: keep one of the two
            predictions = self.server.predict(image_bytes, parameters)
        except HTTPError as e:
            self.send_json(e.status, {"error": e.message})
        except ImageTooLarge as e:
            self.send_json(413, {"error": f"{e} (--max_image_pixels)"})
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

    # -- answering --
    def handle_expect_100(self) -> bool:
        """`Expect: 100-continue`: refuse an oversized or unsized body (serving/body.py's content_length)
        before the client sends it, else tell it to go on."""
        if self.command == "POST":
            try:
                content_length(self.headers, max_bytes=self.server.max_body_bytes)
            except HTTPError as e:
                self.send_json(e.status, {"error": e.message})
                return False
        return super().handle_expect_100()

    def send_json(self, status: int, payload, headers=()) -> None:
        body = json.dumps(payload, allow_nan=False).encode()   # NaN and Infinity are not JSON: never sent
        self.errored, self.answered = status >= 400, True
        self.close_connection = True
        if self.request_version == "HTTP/0.9":   # a garbage request line parses as HTTP/0.9,
            self.request_version = "HTTP/1.0"    # which has no status line: give it one
        try:
            self.connection.settimeout(self.server.read_timeout_s)   # a client that never reads cannot hold us
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


class EmotionServer(BoundedHTTPServer):
    def __init__(self, classifier: ImageClassifier, *, host: str = "127.0.0.1", port: int = 0,
                 max_batch_size: int = 16, max_wait_ms: float = 5, max_body_mb: float = 10,
                 read_timeout_s: float = 10, max_image_pixels: int = MAX_IMAGE_PIXELS,
                 max_detect_side: int = MAX_DETECT_SIDE, max_connections: int = MAX_CONNECTIONS,
                 shutdown_grace_s: float = SHUTDOWN_GRACE_S, quiet: bool = False):
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.classifier = classifier
        self.max_batch_size, self.max_wait_ms = max_batch_size, max_wait_ms
        self.max_body_bytes = int(max_body_mb * 1024 * 1024)
        self.read_timeout_s, self.quiet = read_timeout_s, quiet
        self.max_image_pixels, self.max_detect_side = max_image_pixels, max_detect_side or None
        self.shutdown_grace_s = shutdown_grace_s
        # At most one full-size image per core is decoded (and searched for faces) at once; the other
        # requests wait for a slot, so a burst of large uploads holds a bounded amount of memory.
        self.decode_slots = threading.BoundedSemaphore(os.cpu_count() or 1)
        super().__init__((host, port), Handler, max_connections=max_connections)
        self.batcher = Batcher(classifier.logits, max_batch_size=max_batch_size, max_wait_ms=max_wait_ms)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    # -- predictions --
    def predict(self, image_bytes: bytes, parameters: dict) -> list[dict]:
        regions = self.prepare(image_bytes, parameters)   # [(face box or None, (3, H, W) pixel values)]
        futures = [self.batcher.submit(pixels) for _, pixels in regions]
        scores = [apply_function(f.result()[None], parameters["function_to_apply"])[0]   # (num_labels,)
                  for f in futures]
        if not all(torch.isfinite(s).all() for s in scores):
            raise ValueError(NON_FINITE)
        ranked = [rank(s, self.classifier.labels, top_k=parameters["top_k"]) for s in scores]
        if not parameters["faces"]:
            return ranked[0]
        return [{"box": list(box), "predictions": r} for (box, _), r in zip(regions, ranked)]

    def prepare(self, image_bytes: bytes, parameters: dict) -> list[tuple[tuple | None, torch.Tensor]]:
        """Decode, find the faces, crop and preprocess: every step that holds the full-size image, in one
        of the decode slots, except for a small image without a face search (SMALL_IMAGE_PIXELS). Only
        the small pixel tensors leave; the image is closed before the slot is given back (and long
        before the request waits for its batch)."""
        small = not parameters["faces"] and 0 < header_pixels(image_bytes) <= SMALL_IMAGE_PIXELS
        with contextlib.nullcontext() if small else self.decode_slots:
            image = decode_image(image_bytes, self.max_image_pixels)
            try:
                try:   # with "faces": each face crop is one more row for the batcher
                    regions = (face_crops(image, max_detect_side=self.max_detect_side) if parameters["faces"]
                               else [(None, image)])
                except ValueError as e:                                   # e.g. smaller than the detector's window
                    raise ImageError(f"request body: {e}") from e
                return [(box, self.classifier.pixel_values([crop])[0]) for box, crop in regions]
            finally:
                large = image.width * image.height > LARGE_IMAGE_PIXELS
                image.close()     # frees the pixels now, not when the last reference goes
                if large:
                    release_freed_memory()

    def health(self) -> dict:
        c = self.classifier
        return {"status": "ok", "model": c.path, "layout": c.layout, "labels": c.labels, "device": c.device,
                "dtype": c.dtype_name, "quantize": c.quantize, "max_batch_size": self.max_batch_size,
                "max_wait_ms": self.max_wait_ms, "cpu_threads": torch.get_num_threads(),
                "max_image_pixels": self.max_image_pixels, "max_detect_side": self.max_detect_side,
                "connections": self.connection_counts(), "batching": self.batcher.stats()}

    def close(self, deadline: float | None = None) -> None:
        """After shutdown(): stop listening; requests in flight get until `deadline` (time.monotonic(); by
        default shutdown_grace_s from now) to finish, then every connection still open is closed
        (serving/connections.py); stop the batcher."""
        self.server_close()
        deadline = time.monotonic() + self.shutdown_grace_s if deadline is None else deadline
        left = self.close_connections(deadline)
        if left:
            print(f"closed {left} connection(s) still open after --shutdown_grace_s {self.shutdown_grace_s:g}",
                  file=sys.stderr)
        self.batcher.close(timeout=max(deadline - time.monotonic(), 0.0))


# ---- command line -------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(EMOTION_VIT),
                   help="a transformers ViT folder, a timm folder/file or a bare .safetensors, or a repo id of "
                        "the Hugging Face cache, org/name[@revision] (default: the embedded demo model, trained on synthetic cartoon faces only: embedded/emotion_vit)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8000, help="0 picks a free port (the address is printed)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    p.add_argument("--quantize", default=None, choices=["int8"], help="dynamic int8 Linear layers (CPU)")
    p.add_argument("--max_batch_size", type=int, default=16, help="images per forward pass at most")
    p.add_argument("--max_wait_ms", type=float, default=5, help="how long a batch waits for more requests")
    p.add_argument("--max_body_mb", type=float, default=10, help="larger request bodies get 413")
    p.add_argument("--read_timeout_s", type=float, default=10,
                   help="the request line and headers must arrive within this many seconds, then the body within "
                        "as many again (each a deadline for the whole, not a timeout per read); else 408")
    p.add_argument("--max_image_pixels", type=int, default=MAX_IMAGE_PIXELS,
                   help="images with more pixels get 413, told from their header before decoding (default "
                        f"{MAX_IMAGE_PIXELS:_}: a 24-megapixel photo and some room)")
    p.add_argument("--max_detect_side", type=int, default=MAX_DETECT_SIDE,
                   help='with "faces": true, find faces on a copy shrunk to at most this many pixels a side, the '
                        "boxes mapped back (0: on the full image, OpenCV's exact boxes, slow on large photos)")
    p.add_argument("--max_connections", type=int, default=MAX_CONNECTIONS,
                   help="open connections at most; a connection beyond them gets 503 at once")
    p.add_argument("--shutdown_grace_s", type=float, default=SHUTDOWN_GRACE_S,
                   help="on SIGTERM or Ctrl-C, how long requests in flight may take to finish; then every "
                        "connection still open is closed and the process exits")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch's own work (default: 1 with --device cuda, torch's default on "
                        "the CPU). On a GPU the CPU side of a request is small tensor work, and torch's pool of "
                        "one OpenMP thread per core, entered by 16 request threads at once, halved the batched "
                        "throughput on a 16-core H100 machine (bench/serve.py)")
    p.add_argument("--quiet", action="store_true", help="no access log on stderr")
    args = p.parse_args(argv)
    for flag, low in (("--max_batch_size", 1), ("--port", 0), ("--max_image_pixels", 1), ("--max_detect_side", 0),
                      ("--max_connections", 1)):
        value = getattr(args, flag[2:])
        if value < low:
            p.error(f"{flag} {value}: must be at least {low}")
    if args.port > 65535:
        p.error(f"--port {args.port}: must be at most 65535")
    for flag, low in (("--max_body_mb", "positive"), ("--read_timeout_s", "positive"),
                      ("--max_wait_ms", "zero or more"), ("--shutdown_grace_s", "zero or more")):
        value = getattr(args, flag[2:])
        if not math.isfinite(value):      # nan passes every comparison below; inf would wait forever
            p.error(f"{flag} {value}: must be a finite number")
        if value < 0 or (value == 0 and low == "positive"):
            p.error(f"{flag} {value}: must be {low}")
    if args.threads is not None and args.threads < 1:
        p.error(f"--threads {args.threads}: must be at least 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    threads = args.threads or (1 if args.device.startswith("cuda") else None)   # None: torch's default
    if threads:
        torch.set_num_threads(threads)
    try:
        classifier = ImageClassifier(resolve_model(args.model), device=args.device, dtype=args.dtype,
                                     quantize=args.quantize)
    except (CheckpointError, ValueError, OSError) as e:
        print(f"error: --model {args.model}: {e}", file=sys.stderr)
        return 2
    if warning := slow_precision_warning(DTYPES[args.dtype], torch.device(args.device), flag="--dtype"):
        print(warning, file=sys.stderr)
    # --max_image_pixels, checked from the header, replaces Pillow's own bomb check (a warning over its
    # limit, an error over twice that), which would otherwise be a second limit with another message.
    Image.MAX_IMAGE_PIXELS = None
    try:
        server = EmotionServer(classifier, host=args.host, port=args.port, max_batch_size=args.max_batch_size,
                               max_wait_ms=args.max_wait_ms, max_body_mb=args.max_body_mb,
                               read_timeout_s=args.read_timeout_s, max_image_pixels=args.max_image_pixels,
                               max_detect_side=args.max_detect_side, max_connections=args.max_connections,
                               shutdown_grace_s=args.shutdown_grace_s, quiet=args.quiet)
    except OSError as e:
        print(f"error: --host {args.host} --port {args.port}: cannot listen ({e.strerror or e})", file=sys.stderr)
        return 2

    deadline = None

    def stop(signum, frame):  # serve_forever() runs in this thread: shutdown() must be called from another
        nonlocal deadline
        deadline = time.monotonic() + args.shutdown_grace_s    # the grace counts from the signal
        print(f"{signal.Signals(signum).name}: finishing requests in flight (up to --shutdown_grace_s "
              f"{args.shutdown_grace_s:g}), then exiting (send it again to exit at once)", file=sys.stderr)
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_DFL)
        threading.Thread(target=server.shutdown).start()

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    print(f"serving {args.model} on {server.url}/ (POST an image to /, GET /health)", flush=True)
    server.serve_forever(poll_interval=0.1)   # how soon it sees shutdown() (socketserver's default: 0.5 s)
    server.close(deadline)
    return 0


if __name__ == "__main__":
    code = main()
    # Leave without the interpreter's finalization: request threads closed after the grace and the batcher
    # are daemon threads, and finalizing while one of them is still alive sometimes ran into torch's own
    # teardown and aborted the process ("terminate called without an active exception", exit -6) after a
    # clean shutdown. Everything is closed and written by now; flush and go.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
