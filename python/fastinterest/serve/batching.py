"""Micro-batching of concurrent requests (asyncio).

    batcher = MicroBatcher("interests", session_batch_fn, max_batch=64, max_wait=0.001, max_queue=512)
    batcher.start()
    result = await batcher.submit(item)        # from any request handler
    await batcher.close()                      # at shutdown: the queued items are still answered

One worker task per batcher takes the first waiting item, then everything else already queued (up to
`max_batch`); if the batch is not full it waits `max_wait` seconds once for more, then calls
`fn(items) -> results` (one result per item, same order) in its own thread, so the event loop keeps
accepting requests while the model runs (torch releases the GIL). Requests that arrive during a
computation queue up and form the next batch: the busier the service, the larger the batches.

Back-pressure instead of unbounded queues: `submit` raises `Overloaded` when `max_queue` items are
already waiting (the service answers 429), `Unavailable` once the batcher is closing (503), and items
that waited longer than `queue_timeout` are answered with `Unavailable` instead of being computed late.
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

__all__ = ["MicroBatcher", "Overloaded", "Unavailable"]


class Overloaded(Exception):
    """The queue is full: try again later (HTTP 429)."""


class Unavailable(Exception):
    """Shutting down, or the request waited too long in the queue (HTTP 503)."""


class MicroBatcher:
    def __init__(self, name: str, fn: Callable[[Sequence[Any]], Sequence[Any]], *, max_batch: int = 64,
                 max_wait: float = 0.001, max_queue: int = 512, queue_timeout: float = 2.0,
                 on_batch: Callable[[str, int, float], None] | None = None):
        if max_batch < 1 or max_queue < 1:
            raise ValueError("max_batch and max_queue must be at least 1")
        self.name, self.fn = name, fn
        self.max_batch, self.max_wait, self.max_queue, self.queue_timeout = max_batch, max_wait, max_queue, queue_timeout
        self.on_batch = on_batch            # metrics hook: (name, batch size, seconds)
        self._queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"batch-{name}")
        self._closing = False

    def start(self) -> None:
        self._queue = asyncio.Queue()
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"batcher-{self.name}")

    @property
    def depth(self) -> int:
        return self._queue.qsize() if self._queue is not None else 0

    async def submit(self, item: Any) -> Any:
        if self._closing or self._queue is None:
            raise Unavailable("the service is shutting down")
        if self._queue.qsize() >= self.max_queue:
            raise Overloaded(f"{self.name}: {self.max_queue} requests already waiting")
        future = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((item, future, time.monotonic()))
        return await future

    def _drain(self, batch: list) -> None:
        while len(batch) < self.max_batch:
            try:
                batch.append(self._queue.get_nowait())
            except asyncio.QueueEmpty:
                return

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            first = await self._queue.get()
            if first is None:       # close(): everything queued before it has been answered
                return
            batch = [first]
            self._drain(batch)
            if len(batch) < self.max_batch and self.max_wait > 0 and not self._closing:
                await asyncio.sleep(self.max_wait)
                self._drain(batch)
            stop = any(entry is None for entry in batch)
            batch = [entry for entry in batch if entry is not None]
            now = time.monotonic()
            live = []
            for item, future, queued in batch:
                if future.done():          # the client went away
                    continue
                if now - queued > self.queue_timeout:
                    future.set_exception(Unavailable(f"{self.name}: waited {now - queued:.1f}s in the queue"))
                    continue
                live.append((item, future))
            if live:
                t0 = time.perf_counter()
                try:
                    results = await loop.run_in_executor(self._executor, self.fn, [item for item, _ in live])
                    if len(results) != len(live):
                        raise RuntimeError(f"{self.name}: {len(results)} results for {len(live)} requests")
                except Exception as exc:  # noqa: BLE001 - every waiting request gets the error
                    for _, future in live:
                        if not future.done():
                            future.set_exception(exc)
                else:
                    for (_, future), result in zip(live, results):
                        if not future.done():
                            future.set_result(result)
                if self.on_batch is not None:
                    self.on_batch(self.name, len(live), time.perf_counter() - t0)
            if stop:
                return

    async def close(self) -> None:
        """Stop taking requests, answer those already queued, stop the worker."""
        self._closing = True
        if self._queue is not None and self._task is not None and not self._task.done():
            self._queue.put_nowait(None)
            await self._task
        self._executor.shutdown(wait=True)
