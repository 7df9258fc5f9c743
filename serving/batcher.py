"""Request batching: concurrent callers' images gathered into one forward pass.

A queue and one worker thread. Each caller submits one image's pixel values and gets a Future of its
own row of logits; the worker takes the first waiting request, waits at most max_wait_ms for more (up
to max_batch_size in all), and runs one forward pass for the lot. While a forward pass runs, new
requests queue up and form the next batch, so under load batches fill without waiting at all.

Used by serve_emotion.py; nothing here knows about HTTP.
"""
from __future__ import annotations

import queue
import threading
import time
from collections import Counter
from concurrent.futures import Future
from typing import Callable

import torch


class Batcher:
    """submit() returns a Future of this request's own row of logits, or of the forward pass's exception
    (which fails only the requests of that batch; the worker goes on)."""

    def __init__(self, forward: Callable[[torch.Tensor], torch.Tensor], *, max_batch_size: int,
                 max_wait_ms: float):
        self.forward = forward                   # (B, 3, H, W) pixel values -> (B, num_labels) logits
        self.max_batch_size, self.max_wait_s = max_batch_size, max_wait_ms / 1000
        self.queue: queue.Queue = queue.Queue()  # (pixel_values, future) pairs; None asks the worker to stop
        self.lock = threading.Lock()
        self.requests = self.batches = self.failed_batches = 0
        self.histogram: Counter = Counter()      # batch size -> number of batches of that size
        self.worker = threading.Thread(target=self._run, name="batcher", daemon=True)
        self.worker.start()

    def submit(self, pixel_values: torch.Tensor) -> Future:
        """One image's (3, H, W) pixel values -> a Future of its (num_labels,) logits."""
        future: Future = Future()
        self.queue.put((pixel_values, future))
        return future

    def _gather(self) -> list | None:
        first = self.queue.get()
        if first is None:
            return None
        batch, deadline = [first], time.monotonic() + self.max_wait_s
        while len(batch) < self.max_batch_size:
            try:
                item = self.queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if item is None:           # stop after this batch: put the request to stop back
                self.queue.put(None)
                break
            batch.append(item)
        return batch

    def _run(self) -> None:
        while (batch := self._gather()) is not None:
            pixel_values = torch.stack([p for p, _ in batch])   # (B, 3, H, W)
            try:
                logits = self.forward(pixel_values)              # (B, num_labels)
            except Exception as e:
                with self.lock:
                    self.failed_batches += 1
                for _, future in batch:
                    future.set_exception(e)
                continue
            with self.lock:
                self.requests += len(batch)
                self.batches += 1
                self.histogram[len(batch)] += 1
            for row, (_, future) in zip(logits, batch):
                future.set_result(row)

    def stats(self) -> dict:
        with self.lock:
            return {"requests": self.requests, "batches": self.batches, "failed_batches": self.failed_batches,
                    "max_batch_size_seen": max(self.histogram, default=0),
                    "histogram": {str(size): n for size, n in sorted(self.histogram.items())}}

    def close(self, timeout: float | None = None) -> None:
        """Finish every batch already queued, then stop the worker (waiting at most `timeout` seconds:
        the worker is a daemon thread, which does not keep the process alive)."""
        self.queue.put(None)
        self.worker.join(timeout)
