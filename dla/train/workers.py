"""A local pool of worker processes, one run each, spread over the visible GPUs.

``dla demo`` trains its models side by side with it, and the experiment grids of
``experiments/sweep`` train their runs with it.
"""

from __future__ import annotations

import multiprocessing
import os
import statistics
import time


def run_parallel(
    fn, jobs: list[tuple], workers: int, threads: int, deadline: float | None = None, start_until: float | None = None
):
    """Call ``fn(*job, threads)`` for every job, ``workers`` at a time, each worker a separate
    (spawned, long-lived) process; ``workers == 1`` runs them here. Yields ``(job, result)`` in
    the order they finish. With a ``deadline`` (``time.time()`` seconds) no job is started that
    the typical job time so far says would end after it; none starts after ``start_until``. On a
    machine with several GPUs, worker ``i`` sees only GPU ``i mod n`` (its ``"cuda"`` is that
    GPU), so the workers spread evenly."""
    durations: list[float] = []

    def may_start() -> bool:
        if start_until is not None and time.time() >= start_until:
            return False
        if deadline is None:
            return True
        expected = statistics.median(durations) if durations else 0.0
        return time.time() + expected <= deadline

    if workers <= 1:
        for job in jobs:
            if not may_start():
                return
            started = time.time()
            result = fn(*job, threads)
            durations.append(time.time() - started)
            yield job, result
        return
    context = multiprocessing.get_context("spawn")
    gpus = visible_gpus()
    with context.Pool(workers, initializer=pin_gpu, initargs=(context.Value("i", 0), gpus)) as pool:
        queue, running = list(enumerate(jobs)), {}  # keyed by position: equal jobs stay distinct
        while queue or running:
            while queue and len(running) < workers and may_start():
                index, job = queue.pop(0)
                running[index] = (job, time.time(), pool.apply_async(fn, job + (threads,)))
            if not running:
                return
            done = [key for key, (_, _, res) in running.items() if res.ready()]
            if not done:
                time.sleep(0.2)
                continue
            for key in done:
                job, started, res = running.pop(key)
                durations.append(time.time() - started)
                yield job, res.get()


def visible_gpus() -> list[str]:
    """The CUDA devices this process may use, as ``CUDA_VISIBLE_DEVICES`` entries."""
    import torch

    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [d for d in listed.split(",") if d.strip()]
    return [str(i) for i in range(torch.cuda.device_count())]


def pin_gpu(counter, gpus: list[str]) -> None:
    """Pool initializer: the next worker takes the next GPU (round robin). It runs before the
    worker touches CUDA, which reads ``CUDA_VISIBLE_DEVICES`` when it starts."""
    if len(gpus) < 2:
        return
    with counter.get_lock():
        index = counter.value
        counter.value += 1
    os.environ["CUDA_VISIBLE_DEVICES"] = gpus[index % len(gpus)]


def worker_threads(device: str, workers: int) -> int:
    """CPU threads per worker process: one on a GPU (the GPU does the work), else a share of the cores."""
    return 1 if device == "cuda" else max(1, (os.cpu_count() or 1) // max(1, workers))
