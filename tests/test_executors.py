"""The in-process queue's pool of executors: how many, with how many threads and what memory, and
that runners side by side answer every job with the masks one runner gives (a job's masks depend
on its image, seed and k alone)."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest
import torch

from service.config import Settings
from service.jobs import Output
from service.metrics import Metrics
from service.registry import ModelRegistry
from service.runner.executor import Executor
from service.runner.loop import WIDE_MIN_SAMPLES, ThreadShare
from service.server import executor_count, local_queue
from tests.queue_backends import make_job


@pytest.mark.parametrize(("configured", "device", "threads", "expected"), [
    (None, "cpu", 2, 2), (None, "cpu", 1, 1), (None, "cuda", 16, 1), (3, "cpu", 2, 3), (2, "cuda", 16, 2),
])
def test_executor_count(configured, device, threads, expected):
    assert executor_count(configured, device, threads) == expected


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


async def _masks(model_dir, executors: int, jobs: int = 12) -> tuple[list[np.ndarray], object]:
    settings = Settings(model_dir=model_dir, device="cpu", executors=executors, batch_max_samples=4)
    queue = local_queue(settings, ModelRegistry(model_dir), Metrics())
    await queue.start()
    try:
        results = await asyncio.gather(*(queue.submit(make_job(k=2 + i % 3, seed=i, image_seed=i, side=24)) for i in range(jobs)))
        return [r[Output.LABELS] for r in results], queue._consumer
    finally:
        await queue.stop()


def test_executors_side_by_side_give_the_masks_one_gives(model_dir, restore_threads):
    torch.set_num_threads(2)
    one, _ = asyncio.run(_masks(model_dir, 1))
    torch.set_num_threads(2)
    seen: set[str] = set()
    execute = Executor.execute

    def recording(self, batch, computed=None):
        seen.add(threading.current_thread().name)
        return execute(self, batch, computed)

    Executor.execute = recording
    try:
        two, pool = asyncio.run(_masks(model_dir, 2))
    finally:
        Executor.execute = execute
    assert len(pool.threads) == 2 and not pool.is_alive()  # stopped with the queue
    assert torch.get_num_threads() == 1  # two threads shared out: one each
    # each runner has half the process's sampler budget, so both at once keep to it
    assert {t.runner.executor.memory_budget for t in pool.threads} == {Settings().sampler_memory_mb * 2**20 // 2}
    assert len(seen) == 2, f"one runner thread ran every batch: {seen}"
    for a, b in zip(one, two, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(("samples", "busy", "expected"), [(16, 1, 2), (4, 1, 2), (3, 1, 1), (16, 2, 1), (1, 1, 1), (64, 0, 2)])
def test_a_lone_batch_of_several_samples_takes_every_thread(samples, busy, expected):
    assert ThreadShare(total=2, executors=2).choose(samples, busy) == expected
    assert ThreadShare(total=3, executors=2).narrow == 1  # never more threads than the cores


def test_runner_threads_widen_for_a_lone_batch_and_narrow_back(model_dir, restore_threads):
    """One job at a time through two executors: each batch is alone, so k >= WIDE_MIN_SAMPLES runs on
    both threads and k=1 on one; the process's other threads keep their share."""
    torch.set_num_threads(2)
    ran: list[tuple[int, int]] = []
    execute = Executor.execute

    def recording(self, batch, computed=None):
        ran.append((sum(d.job.k for d in batch), torch.get_num_threads()))
        execute(self, batch, computed)
        # the runner lingers after answering (a loaded machine may preempt it there): the next job,
        # already on the other runner, must not find this one counted busy
        time.sleep(0.05)

    async def one_at_a_time() -> None:
        queue = local_queue(Settings(model_dir=model_dir, device="cpu", executors=2), ModelRegistry(model_dir), Metrics())
        await queue.start()
        try:
            for i, k in enumerate([WIDE_MIN_SAMPLES, 1, 8, 1, 1, WIDE_MIN_SAMPLES]):
                await queue.submit(make_job(k=k, seed=i, image_seed=i, side=24))
        finally:
            await queue.stop()

    Executor.execute = recording
    try:
        asyncio.run(one_at_a_time())
    finally:
        Executor.execute = execute
    assert ran == [(WIDE_MIN_SAMPLES, 2), (1, 1), (8, 2), (1, 1), (1, 1), (WIDE_MIN_SAMPLES, 2)]
    assert torch.get_num_threads() == 1
