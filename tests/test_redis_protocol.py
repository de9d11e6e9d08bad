"""The Redis protocol's encodings, round-tripped through a real redis-server: a job in its own
dtype, results holding exactly the outputs asked for, recorded errors, malformed entries."""

import time

import numpy as np
import pytest
import redis

from service.errors import DeadlineExceeded, InferenceFailed
from service.jobs import Job, JobResult, Output
from service.queue.redis_protocol import decode_payload, encode_error, encode_result, job_fields, parse_job
from tests.queue_backends import make_job


def through_redis(url, fields):
    client = redis.Redis.from_url(url)
    entry_id = client.xadd("roundtrip", fields)
    [(_, stored)] = client.xrange("roundtrip", min=entry_id, max=entry_id)
    return stored


@pytest.mark.parametrize("dtype", ["uint8", "uint16", ">u2", "float32", ">f4"])
def test_a_job_crosses_redis_in_its_own_dtype(redis_url, dtype):
    # big-endian arrays as a client's .npy may hold them
    pixels = (np.arange(9 * 9 * 3).reshape(9, 9, 3) * (0.001 if "f" in dtype else 1)).astype(dtype)
    job = Job("tiny", "1", pixels, k=7, seed=2**62 + 3, deadline=time.time() + 5, outputs=frozenset({Output.LABELS, Output.P_F}))
    stored = through_redis(redis_url, job_fields(job))
    assert len(stored[b"image"]) == pixels.nbytes  # raw pixels, no float32 widening, no base64
    back = parse_job(stored)
    assert back.image.dtype.name == pixels.dtype.name and np.array_equal(back.image, pixels)
    assert (back.id, back.model, back.version, back.k, back.seed, back.outputs) == (job.id, job.model, job.version, 7, 2**62 + 3, job.outputs)
    assert back.deadline == job.deadline and back.enqueued == job.enqueued  # repr of a float reads back exactly


@pytest.mark.parametrize(
    "change,message",
    [({"shape": "9,9,2"}, "does not fit"), ({"shape": "81,3"}, "does not fit"), ({"dtype": "int64"}, "dtype"),
     ({"outputs": "labels,nonsense"}, "nonsense"), ({"k": "0"}, "k must be")],
)
def test_malformed_entries_are_value_errors(redis_url, change, message):
    fields = {**job_fields(make_job(side=9)), **change}
    with pytest.raises(ValueError, match=message):
        parse_job(through_redis(redis_url, fields))


def test_an_entry_missing_a_field_is_a_key_error(redis_url):
    fields = job_fields(make_job())
    del fields["seed"]
    with pytest.raises(KeyError):
        parse_job(through_redis(redis_url, fields))


def test_a_result_holds_exactly_its_outputs_and_timings(redis_url):
    labels = np.random.default_rng(0).integers(0, 2, (4, 5, 6), dtype=np.uint8)
    p_f = np.random.default_rng(1).random((2, 5, 6), dtype=np.float32)
    result = JobResult({Output.LABELS: labels, Output.P_F: p_f}, queue_wait_s=0.25, compute_s=1.5, batch_jobs=3)
    client = redis.Redis.from_url(redis_url)
    client.rpush("result", encode_result(result))
    back = decode_payload(client.blpop(["result"], timeout=1)[1])
    assert set(back.arrays) == {Output.LABELS, Output.P_F}
    assert np.array_equal(back[Output.LABELS], labels) and back[Output.LABELS].dtype == np.uint8
    assert np.array_equal(back[Output.P_F], p_f)
    assert (back.queue_wait_s, back.compute_s, back.batch_jobs) == (0.25, 1.5, 3)


def test_recorded_errors_come_back_as_their_own_exception():
    with pytest.raises(DeadlineExceeded, match="expired"):
        decode_payload(encode_error(DeadlineExceeded("the job expired in the queue")))
    with pytest.raises(InferenceFailed, match="dead-lettered"):
        decode_payload(encode_error(InferenceFailed("job x failed 3 times and was dead-lettered")))
