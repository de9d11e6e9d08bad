"""What travels through Redis and under which keys. Pixels travel as raw bytes, never base64 or
JSON: a job's image in its own dtype (a 128 x 128 8-bit crop is 16 KiB on the stream), a result as
an npz of exactly the arrays the job asked for.

A job is one stream entry with the fields ``id model version k seed deadline enqueued`` (text),
``outputs`` (comma-separated ``Output`` names), ``dtype`` (uint8 | uint16 | float32), ``shape``
(``H,W,C``) and ``image`` (the pixels, C order). A result is ``R`` + an npz of the outputs and
``meta`` = [queue_wait_s, compute_s, batch_jobs], or ``E`` + JSON ``{"reason", "detail"}``.

Keys (``P`` = the prefix):
  P:jobs:<model>        stream of jobs; consumer group ``workers``; entries are deleted once answered
  P:dead:<model>        dead-letter stream (job metadata and the reason, no pixels)
  P:result:<job id>     list the API waits on with BLPOP; one payload, expires after result_ttl_s
  P:answered:<job id>   marker that makes answering idempotent: a reclaimed job answered twice is
                        stored once
  P:heartbeats:<model>  sorted set: worker name -> time of its last heartbeat
  P:stats               hash of cumulative counters across workers: redeliveries, dead_letters, duplicates
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass

import numpy as np

from service.errors import DeadlineExceeded, InferenceFailed, ServiceError
from service.jobs import IMAGE_DTYPES, Job, JobResult, Output

GROUP = "workers"
_OK, _ERR = b"R", b"E"

# Store the result, mark the job answered and acknowledge it, atomically: XACK happens only with
# the result stored, and a second answer to the same job (after a reclaim) is dropped.
ANSWER_SCRIPT = """
local first = redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[2])
if first then
  redis.call('RPUSH', KEYS[2], ARGV[1])
  redis.call('EXPIRE', KEYS[2], ARGV[2])
else
  redis.call('HINCRBY', KEYS[4], 'duplicates', 1)
end
redis.call('XACK', KEYS[3], ARGV[3], ARGV[4])
redis.call('XDEL', KEYS[3], ARGV[4])
if first then return 1 else return 0 end
"""


@dataclass(frozen=True)
class Keys:
    prefix: str

    def stream(self, model: str) -> str:
        return f"{self.prefix}:jobs:{model}"

    def dead(self, model: str) -> str:
        return f"{self.prefix}:dead:{model}"

    def result(self, job_id: str) -> str:
        return f"{self.prefix}:result:{job_id}"

    def answered(self, job_id: str) -> str:
        return f"{self.prefix}:answered:{job_id}"

    def heartbeats(self, model: str) -> str:
        return f"{self.prefix}:heartbeats:{model}"

    @property
    def stats(self) -> str:
        return f"{self.prefix}:stats"


def job_fields(job: Job) -> dict[str, bytes | str | int | float]:
    image = np.ascontiguousarray(job.image)
    return {
        "id": job.id, "model": job.model, "version": job.version, "k": job.k, "seed": job.seed,
        "deadline": repr(job.deadline), "enqueued": repr(job.enqueued), "outputs": ",".join(sorted(job.outputs)),
        "dtype": image.dtype.name, "shape": ",".join(str(d) for d in image.shape), "image": image.tobytes(),
    }


def parse_job(fields: dict[bytes, bytes]) -> Job:
    """Stream entry -> Job. Raises ValueError (or KeyError) on a malformed entry."""
    f = {k.decode(): v for k, v in fields.items()}
    dtype = f["dtype"].decode()
    if dtype not in IMAGE_DTYPES:
        raise ValueError(f"image dtype {dtype!r} is not one of {IMAGE_DTYPES}")
    shape = tuple(int(d) for d in f["shape"].decode().split(","))
    image = np.frombuffer(f["image"], dtype=dtype)
    if len(shape) != 3 or image.size != int(np.prod(shape)):
        raise ValueError(f"image of {image.size} values does not fit shape {shape}")
    return Job(
        model=f["model"].decode(), version=f["version"].decode(), image=image.reshape(shape), k=int(f["k"]),
        seed=int(f["seed"]), deadline=float(f["deadline"]), outputs=frozenset(Output(o) for o in f["outputs"].decode().split(",")),
        id=f["id"].decode(), enqueued=float(f["enqueued"]),
    )


def encode_result(result: JobResult) -> bytes:
    buf = io.BytesIO()
    meta = np.array([result.queue_wait_s, result.compute_s, result.batch_jobs], dtype=np.float64)
    np.savez(buf, meta=meta, **{str(name): array for name, array in result.arrays.items()})
    return _OK + buf.getvalue()


def encode_error(error: ServiceError) -> bytes:
    return _ERR + json.dumps({"reason": error.reason, "detail": error.detail}).encode()


_ERRORS: dict[str, type[ServiceError]] = {cls.reason: cls for cls in (DeadlineExceeded, InferenceFailed)}


def decode_payload(payload: bytes) -> JobResult:
    """A stored payload -> JobResult, or raise the error the worker recorded."""
    if payload.startswith(_ERR):
        error = json.loads(payload[1:])
        raise _ERRORS.get(error["reason"], InferenceFailed)(error["detail"])
    with np.load(io.BytesIO(payload[1:])) as z:
        meta = z["meta"]
        arrays = {Output(name): z[name] for name in z.files if name != "meta"}
    return JobResult(arrays, queue_wait_s=float(meta[0]), compute_s=float(meta[1]), batch_jobs=int(meta[2]))
