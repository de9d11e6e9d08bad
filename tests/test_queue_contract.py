"""One contract for both JobQueue backends: the in-process queue and Redis Streams (against a
real redis-server)."""

import asyncio
import time

import numpy as np
import pytest

from service.errors import DeadlineExceeded, QueueFull
from service.jobs import Output
from tests.queue_backends import depth, make_job, open_backend, wait_until


@pytest.fixture(params=["local", "redis"])
def backend(request, model_dir):
    url = request.getfixturevalue("redis_url") if request.param == "redis" else None
    return lambda **kw: open_backend(request.param, model_dir, url, **kw)


def test_results_have_the_shapes_asked_for_and_only_the_outputs_asked_for(backend):
    async def main():
        async with backend() as (queue, _, _):
            return await queue.submit(make_job(k=5, side=24)), await queue.submit(make_job(k=3, outputs=frozenset({Output.LABELS})))

    full, masks_only = asyncio.run(main())
    assert full[Output.LABELS].shape == (5, 24, 24) and full[Output.LABELS].dtype == np.uint8
    assert full[Output.P_F].shape == (2, 24, 24) and full[Output.P_F].dtype == np.float32
    for name in (Output.ALEATORIC_ENTROPY, Output.SAMPLE_ENTROPY, Output.MUTUAL_INFORMATION, Output.SAMPLE_VARIANCE):
        assert full[name].shape == (24, 24) and full[name].dtype == np.float32
    assert set(masks_only.arrays) == {Output.LABELS} and masks_only[Output.LABELS].shape == (3, 16, 16)


def test_same_seed_same_result_alone_and_among_concurrent_jobs(backend):
    async def main():
        async with backend(batch_max_delay_ms=50) as (queue, _, _):
            alone = await queue.submit(make_job(k=4, seed=77, image_seed=1))
            crowd = await asyncio.gather(*(queue.submit(make_job(k=1 + i % 5, seed=i, image_seed=i)) for i in range(12)),
                                         queue.submit(make_job(k=4, seed=77, image_seed=1)))
            return alone, crowd

    alone, crowd = asyncio.run(main())
    assert np.array_equal(alone[Output.LABELS], crowd[-1][Output.LABELS])
    assert np.allclose(alone[Output.SAMPLE_ENTROPY], crowd[-1][Output.SAMPLE_ENTROPY], atol=1e-5)
    assert [r[Output.LABELS].shape[0] for r in crowd[:-1]] == [1 + i % 5 for i in range(12)]


def test_many_concurrent_jobs_are_all_answered(backend):
    async def main():
        async with backend() as (queue, _, _):
            return await asyncio.gather(*(queue.submit(make_job(k=2, seed=i, image_seed=i)) for i in range(24)))

    results = asyncio.run(main())
    assert len(results) == 24 and all(r[Output.LABELS].shape == (2, 16, 16) for r in results)


def test_deadline_without_a_consumer_is_a_timeout(backend):
    async def main():
        async with backend(consumer=False) as (queue, _, _):
            started = time.monotonic()
            with pytest.raises(DeadlineExceeded):
                await queue.submit(make_job(timeout_s=0.3))
            return time.monotonic() - started

    assert asyncio.run(main()) < 5


def test_full_backlog_is_refused(backend):
    async def main():
        async with backend(consumer=False, max_queued_jobs=2) as (queue, _, metrics):
            waiting = [asyncio.create_task(queue.submit(make_job(timeout_s=1.0))) for _ in range(2)]

            async def both_queued() -> bool:
                return await depth(queue, metrics) == 2

            await wait_until(both_queued)
            with pytest.raises(QueueFull):
                await queue.submit(make_job(timeout_s=1.0))
            for task in waiting:
                with pytest.raises(DeadlineExceeded):
                    await task

    asyncio.run(main())

