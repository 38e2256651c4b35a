"""Build batches ahead in a background thread, so the training step never waits on the data.

A thread (not a process) suffices: building a batch is numpy gathers over arrays already in
memory, short beside a training step, and a thread shares those arrays without copying them.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")
_DONE = object()


def prefetch(items: Iterable[T], depth: int = 2) -> Iterator[T]:
    """Yield the items of ``items`` in order while a worker thread computes up to ``depth`` ahead.

    ``depth`` <= 0 iterates inline. An exception raised while producing an item is re-raised
    here, in the consumer, at that item's place; a consumer that stops early stops the worker."""
    if depth <= 0:
        yield from items
        return
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(x) -> bool:
        while not stop.is_set():
            try:
                q.put(x, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for x in items:
                if not put((x, None)):
                    return
        except BaseException as e:  # handed to the consumer, raised there
            put((_DONE, e))
            return
        put((_DONE, None))

    worker = threading.Thread(target=work, name="qdrank-prefetch", daemon=True)
    worker.start()
    try:
        while True:
            x, err = q.get()
            if x is _DONE:
                if err is not None:
                    raise err
                return
            yield x
    finally:
        stop.set()
        worker.join()
