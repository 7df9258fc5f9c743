"""serve_emotion.py throughput with request batching against one image per forward pass, in one run.

    flock /tmp/bench.lock .venv-dev/bin/python bench/serve.py [--requests 128] [--rounds 3]

A full-size ViT-B/16 with random weights (written once to a temporary folder with our exporter) is
served by serve_emotion.py in bf16 (--dtype) on the CPU, on loopback, once with --max_batch_size 16 (batching)
and once with --max_batch_size 1 (no batching). 16 client threads send a 224x224 JPEG back to back.
Each round starts a fresh server, warms it up, then times a fixed number of requests; rounds alternate
the two settings so machine noise hits both. Prints requests/s (median over rounds), p50/p99 latency
(over every timed request) and the throughput ratio (> 1.0: batching is faster). Both sides are ours:
no reference library is involved.

For comparison the script first measures the model alone, in-process and without HTTP: forward time
per image at batch 1 against batch 16 (same weights and dtype). On a CPU, where batch 1 already keeps
the cores busy, that gain is small; serving has gained more in our runs, probably because one forward
pass per batch means fewer thread synchronisations competing with the request threads for the cores.
On a GPU, where one image leaves most of the chip idle, the model's own gain is large (16.8x on an
H100), and what limits serving is the CPU side of each request: with torch's default of one OpenMP
thread per core (16 there), 16 request threads entering that pool at once gave batching only 1.38x
(220 against 159 requests/s). serve_emotion.py now uses one torch thread with --device cuda
(--threads): 2.27x (340 against 150) in 3 rounds of --requests 512, 1.95x in a second run.

    ... bench/serve.py --case hostile [--requests 64]

The hostile case asks whether the server's bounds (docs/reliability.md) hold under abuse. One server
(--max_batch_size 16) and 16 concurrent clients: 8 normal ones sending the JPEG back to back, 4 sending
huge PNGs (decompression bombs claiming 20000x20000, refused from the header with 413, alternating
with real 5000x4000 images of 67 kB that decode to 60 MB each) and 4 slow ones sending one header byte
every 0.5 s (408 at the header deadline, then they reconnect). It prints whether the server stayed
healthy (every normal request 200, /health answering throughout), the normal clients' p99 latency
against the same 8 clients' p99 alone (target under 2x), and the server's RSS before the hostile
clients start, at its peak, and after they stop (target: back within 100 MB).
"""
from __future__ import annotations

import argparse
import http.client
import io
import json
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {"batched": 16, "unbatched": 1}  # name -> --max_batch_size


def make_image() -> bytes:
    """A 224x224 JPEG with some texture (decode and resize cost like a real face crop)."""
    from PIL import Image
    image = Image.merge("RGB", [Image.effect_noise((224, 224), sigma).convert("L") for sigma in (20, 40, 60)])
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def start_server(folder: str, device: str, dtype: str, max_batch_size: int,
                 max_wait_ms: float) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen([sys.executable, str(ROOT / "serve_emotion.py"), "--model", folder, "--dtype", dtype,
                             "--device", device,
                             "--port", "0", "--quiet", "--max_batch_size", str(max_batch_size),
                             "--max_wait_ms", str(max_wait_ms)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if "http://127.0.0.1:" not in line:
        proc.kill()
        raise RuntimeError(f"serve_emotion.py did not start: {line}{proc.stderr.read()}")
    return proc, int(line.split("http://127.0.0.1:")[1].split("/")[0])


def call(port: int, method: str, path: str, body: bytes | None = None) -> tuple[int, object]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    conn.request(method, path, body=body)
    response = conn.getresponse()
    result = response.status, json.loads(response.read())
    conn.close()
    return result


def load(port: int, image: bytes, requests: int, concurrency: int) -> tuple[float, list[float]]:
    """`requests` POSTs from `concurrency` threads, each sending back to back -> (seconds, latencies)."""
    latencies, lock, left = [], threading.Lock(), [requests]

    def client():
        while True:
            with lock:
                if left[0] == 0:
                    return
                left[0] -= 1
            t = time.perf_counter()
            status, answer = call(port, "POST", "/", image)
            if status != 200:
                raise RuntimeError(f"request failed: {status} {answer}")
            with lock:
                latencies.append(time.perf_counter() - t)

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - start
    if len(latencies) != requests:
        raise RuntimeError(f"only {len(latencies)} of {requests} requests succeeded")
    return seconds, latencies


def rss_mb(pid: int) -> float | None:
    """The process's resident memory from /proc (Linux), else None."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS:"))
    except OSError:
        return None


def bomb_png(width: int, height: int) -> bytes:
    """A 69-byte PNG whose header claims width x height 8-bit grey pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(bytes(64)))
            + chunk(b"IEND", b""))


def large_png(width: int, height: int) -> bytes:
    """A flat-colour RGB PNG: a few tens of kB that decode to width * height * 3 bytes."""
    from PIL import Image
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (120, 80, 40)).save(buffer, format="PNG")
    return buffer.getvalue()


def hostile(folder: str, args) -> None:
    """The hostile case of the module docstring."""
    image, bomb, large = make_image(), bomb_png(20000, 20000), large_png(5000, 4000)
    proc, port = start_server(folder, args.device, args.dtype, 16, args.max_wait_ms)
    stop, counts, lock = threading.Event(), Counter(), threading.Lock()
    health = Counter()

    def count(key: str) -> None:
        with lock:
            counts[key] += 1

    def huge_sender(first: int):
        for i in range(first, 10 ** 9):
            if stop.is_set():
                return
            body, name = (bomb, "bomb (20000x20000 claimed)") if i % 2 == 0 else (large, "large (5000x4000, decoded)")
            count(f"{name}: {call(port, 'POST', '/', body)[0]}")

    def slow_sender():
        while not stop.is_set():
            with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
                try:
                    for byte in b"POST / HTTP/1.1\r\nHost: localhost\r\nContent-Type: image/jpeg\r\n":
                        sock.sendall(bytes([byte]))
                        if stop.wait(0.5):
                            break
                    answer = sock.recv(1 << 16)
                except OSError as e:      # the server answered 408 and closed while we were still sending
                    answer = sock.recv(1 << 16) if isinstance(e, BrokenPipeError) else type(e).__name__.encode()
            status = answer.split(b" ")[1].decode() if answer.startswith(b"HTTP/") else answer[:30].decode()
            count(f"slow headers: {status or 'closed'}")

    def health_checker():
        while not stop.wait(0.5):
            try:
                health["ok" if call(port, "GET", "/health")[0] == 200 else "failed"] += 1
            except OSError:
                health["failed"] += 1

    try:
        load(port, image, args.warmup, 8)
        _, alone = load(port, image, args.requests, 8)
        before = rss_mb(proc.pid)
        peak, sampler_stop = [before or 0.0], threading.Event()

        def sampler():
            while not sampler_stop.wait(0.02):
                peak[0] = max(peak[0], rss_mb(proc.pid) or 0.0)
        others = ([threading.Thread(target=huge_sender, args=(i,)) for i in range(4)]
                  + [threading.Thread(target=slow_sender) for _ in range(4)]
                  + [threading.Thread(target=health_checker)])
        watcher = threading.Thread(target=sampler)
        watcher.start()
        for thread in others:
            thread.start()
        time.sleep(2.0)                       # let the hostile clients get going
        try:
            _, loaded = load(port, image, args.requests, 8)
            normal_ok = True
        except RuntimeError as e:             # a normal request that did not get 200
            print(f"normal clients failed: {e}")
            loaded, normal_ok = [float("nan")], False
        stop.set()
        for thread in others:
            thread.join()
        time.sleep(1.0)
        sampler_stop.set()
        watcher.join()
        after = rss_mb(proc.pid)
        final_status, final = call(port, "GET", "/health")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)

    healthy = normal_ok and health["failed"] == 0 and final_status == 200
    p99_alone, p99_loaded = 1000 * percentile(alone, 99), 1000 * percentile(loaded, 99)
    print(f"\nhostile clients' answers: {dict(sorted(counts.items()))}")
    print(f"server healthy: {'yes' if healthy else 'NO'} (normal requests all 200: {normal_ok}; /health during the "
          f"load: {health['ok']} ok, {health['failed']} failed; after: {final_status}; connections "
          f"{final['connections']})")
    print(f"normal clients' p99: {p99_alone:.0f} ms alone, {p99_loaded:.0f} ms beside the hostile clients: "
          f"{p99_loaded / p99_alone:.2f}x (target < 2x); p50 {1000 * percentile(alone, 50):.0f} -> "
          f"{1000 * percentile(loaded, 50):.0f} ms")
    if before is None:
        print("server RSS: not measured (no /proc)")
    else:
        print(f"server RSS: {before:.0f} MB before, {peak[0]:.0f} MB peak, {after:.0f} MB after: "
              f"{after - before:+.0f} MB (target within 100 MB)")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def model_ceiling(folder: str, device: str, dtype: str, batch_size: int, rounds: int) -> tuple[float, float]:
    """Forward seconds per image at batch 1 and at batch_size (medians over rounds), no HTTP involved."""
    import torch
    from vit.classifier import ImageClassifier
    classifier = ImageClassifier(folder, device=device, dtype=dtype)
    x = torch.randn(batch_size, 3, 224, 224, generator=torch.Generator().manual_seed(0))

    def per_image(batch: torch.Tensor, repeats: int) -> float:
        classifier.logits(batch)                                    # warm-up for this shape
        start = time.perf_counter()
        for _ in range(repeats):
            classifier.logits(batch)                                # returns on the CPU: synchronised
        return (time.perf_counter() - start) / (repeats * len(batch))

    one, many = [], []
    for _ in range(rounds):
        one.append(per_image(x[:1], batch_size))
        many.append(per_image(x, 1))
    return statistics.median(one), statistics.median(many)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--requests", type=int, default=128, help="timed requests per round and setting")
    p.add_argument("--warmup", type=int, default=48, help="untimed requests after each server start")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--max_wait_ms", type=float, default=5)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", default="bf16", choices=["fp32", "bf16", "fp16"],
                   help="the served model's precision (bf16: fast where the CPU has bf16 instructions, very slow "
                        "where it has not)")
    p.add_argument("--case", default="batching", choices=["batching", "hostile"],
                   help="batching: batched against unbatched throughput; hostile: bombs, large images and slow "
                        "clients beside normal ones (--requests per phase, --rounds unused)")
    args = p.parse_args()

    import torch
    sys.path.insert(0, str(ROOT))
    from vit.model import ViTConfig, ViTForImageClassification
    from vit.preprocess import PreprocessConfig
    from vit.weights import save_pretrained

    if args.case == "hostile":
        print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads; ViT-B/16 random weights, "
              f"{args.dtype} on {args.device}; 8 normal clients x {args.requests} timed requests (after "
              f"{args.warmup} warm-up), then the same beside 4 huge-image and 4 slow clients", flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            torch.manual_seed(0)
            save_pretrained(ViTForImageClassification(ViTConfig.b16()), PreprocessConfig(), Path(tmp) / "vit-b16")
            hostile(str(Path(tmp) / "vit-b16"), args)
        return
    image = make_image()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads; ViT-B/16 random weights, "
          f"{args.dtype} on {args.device}; concurrency {args.concurrency}; {args.rounds} rounds x {args.requests} "
          f"timed requests (after {args.warmup} warm-up); --max_wait_ms {args.max_wait_ms}; {len(image)}-byte JPEG")
    results = {name: {"rps": [], "latencies": [], "histogram": Counter()} for name in SETTINGS}
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        save_pretrained(ViTForImageClassification(ViTConfig.b16()), PreprocessConfig(), Path(tmp) / "vit-b16")
        folder = str(Path(tmp) / "vit-b16")
        batch = SETTINGS["batched"]
        one, many = model_ceiling(folder, args.device, args.dtype, batch, args.rounds)
        print(f"model alone: {1000 * one:.1f} ms per image at batch 1, {1000 * many:.1f} ms at batch {batch}: "
              f"{one / many:.2f}x from batching without HTTP", flush=True)
        for round_ in range(args.rounds):
            for name, max_batch_size in SETTINGS.items():
                proc, port = start_server(folder, args.device, args.dtype, max_batch_size, args.max_wait_ms)
                try:
                    load(port, image, args.warmup, args.concurrency)
                    before = call(port, "GET", "/health")[1]["batching"]["histogram"]
                    seconds, latencies = load(port, image, args.requests, args.concurrency)
                    after = call(port, "GET", "/health")[1]["batching"]["histogram"]
                finally:
                    proc.send_signal(signal.SIGTERM)
                    proc.wait(timeout=60)
                r = results[name]
                r["rps"].append(args.requests / seconds)
                r["latencies"] += latencies
                r["histogram"] += Counter({int(k): n - before.get(k, 0) for k, n in after.items()})
                print(f"  round {round_ + 1} {name:9s} {args.requests / seconds:6.2f} requests/s", flush=True)

    print(f"\n{'setting':28s} {'requests/s':>10s} {'p50 ms':>8s} {'p99 ms':>8s} {'mean batch':>10s}")
    for name, max_batch_size in SETTINGS.items():
        r = results[name]
        batches = sum(r["histogram"].values())
        mean_batch = sum(size * n for size, n in r["histogram"].items()) / max(batches, 1)
        print(f"{name + f' (--max_batch_size {max_batch_size})':28s} {statistics.median(r['rps']):10.2f} "
              f"{1000 * percentile(r['latencies'], 50):8.0f} {1000 * percentile(r['latencies'], 99):8.0f} "
              f"{mean_batch:10.1f}")
    ratio = statistics.median(results["batched"]["rps"]) / statistics.median(results["unbatched"]["rps"])
    print(f"\nthroughput ratio, batched / unbatched: {ratio:.2f}x (target >= 2x; the model alone gains "
          f"{one / many:.2f}x from batch {batch})")


if __name__ == "__main__":
    main()
