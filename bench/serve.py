"""serve_emotion.py throughput with request batching against one image per forward pass, in one run.

    flock /tmp/bench.lock .venv-dev/bin/python bench/serve.py [--requests 128] [--rounds 3]

A full-size ViT-B/16 with random weights (written once to a temporary folder with our exporter) is
served by serve_emotion.py in bf16 on the CPU, on loopback, once with --max_batch_size 16 (batching)
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
"""
from __future__ import annotations

import argparse
import http.client
import io
import json
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
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


def start_server(folder: str, device: str, max_batch_size: int, max_wait_ms: float) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen([sys.executable, str(ROOT / "serve_emotion.py"), "--model", folder, "--dtype", "bf16",
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


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def model_ceiling(folder: str, device: str, batch_size: int, rounds: int) -> tuple[float, float]:
    """Forward seconds per image at batch 1 and at batch_size (medians over rounds), no HTTP involved."""
    import torch
    from vit.classifier import ImageClassifier
    classifier = ImageClassifier(folder, device=device, dtype="bf16")
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
    p.add_argument("--device", default="cpu", help="cpu or cuda (bf16 either way)")
    args = p.parse_args()

    import torch
    sys.path.insert(0, str(ROOT))
    from vit.model import ViTConfig, ViTForImageClassification
    from vit.preprocess import PreprocessConfig
    from vit.weights import save_pretrained

    image = make_image()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads; ViT-B/16 random weights, bf16 on "
          f"{args.device}; concurrency {args.concurrency}; {args.rounds} rounds x {args.requests} timed requests "
          f"(after {args.warmup} warm-up); --max_wait_ms {args.max_wait_ms}; {len(image)}-byte JPEG")
    results = {name: {"rps": [], "latencies": [], "histogram": Counter()} for name in SETTINGS}
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        save_pretrained(ViTForImageClassification(ViTConfig.b16()), PreprocessConfig(), Path(tmp) / "vit-b16")
        folder = str(Path(tmp) / "vit-b16")
        batch = SETTINGS["batched"]
        one, many = model_ceiling(folder, args.device, batch, args.rounds)
        print(f"model alone: {1000 * one:.1f} ms per image at batch 1, {1000 * many:.1f} ms at batch {batch}: "
              f"{one / many:.2f}x from batching without HTTP", flush=True)
        for round_ in range(args.rounds):
            for name, max_batch_size in SETTINGS.items():
                proc, port = start_server(folder, args.device, max_batch_size, args.max_wait_ms)
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
