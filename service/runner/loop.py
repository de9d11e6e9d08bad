"""The runner's loop: collect a batch, execute it, repeat until stopped. ``carseg worker`` runs it
in its main thread over the Redis consumer; ``carseg serve`` runs it in a thread over the
in-process queue."""

from __future__ import annotations

import ctypes
import ctypes.util
import threading
from collections.abc import Callable

import torch

from service.config import Settings
from service.metrics import Metrics
from service.queue.base import Delivery, JobSource
from service.runner.batching import BatchCollector
from service.runner.executor import Executor
from service.runner.models import ModelPool
from training.sampling import flush_denormals


def _malloc_trim() -> Callable[[], None]:
    """glibc's malloc_trim(0), or nothing where libc is not glibc. After a batch, the allocator
    keeps the freed activations resident, so a worker's RSS rose with the largest batch it had seen
    (a soak: one worker's floor went 507 -> 639 MB over five minutes while the other stayed flat);
    trimming returns them. A runner trims when it has gone idle and no other runner of the process
    is computing, not after every batch: the next batch faults the pages back in (k=16 at 128 x 128
    on one thread: 160-172 ms trimming after every batch, 122-128 ms without), and in the in-process
    pool one executor idles while another computes (there k=16 took 143 ms on one thread when an
    idle runner trimmed at most every 5 s, 113 ms with this rule). Under a 70% soak the workers'
    RSS floors still return to their trimmed level (~309 MiB) between idle gaps."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return lambda: None
    return lambda: trim(0) and None


release_free_memory = _malloc_trim()


class _Busy:
    """How many runners of this process are computing a batch."""

    def __init__(self) -> None:
        self._lock, self._count = threading.Lock(), 0

    def enter(self) -> Callable[[], None]:
        """Count one more runner busy; the returned release (once, whatever calls it) uncounts it."""
        with self._lock:
            self._count += 1
        released = False

        def release() -> None:
            nonlocal released
            with self._lock:
                if not released:
                    released = True
                    self._count -= 1

        return release

    def none(self) -> bool:
        return self.count() == 0

    def count(self) -> int:
        with self._lock:
            return self._count


_busy = _Busy()

# Below this many samples in a batch, more threads gain nothing on a CPU (one thread vs two, 128 x 128
# LIDC crop, in a runner thread: k=1 48 vs 50 ms, k=2 54 vs 59, k=4 76 vs 67, k=16 171 vs 125).
WIDE_MIN_SAMPLES = 4


class ThreadShare:
    """How many torch threads a runner of the in-process pool computes its next batch with. Each of
    the pool's executors owns ``total // executors`` threads, so that all of them busy fill the cores
    without oversubscribing them; but with one request in flight that leaves the other cores idle.
    A runner that starts a batch of ``WIDE_MIN_SAMPLES`` or more while no other runner of the
    process computes takes all ``total``; if another starts meanwhile, the cores are oversubscribed
    until that wide batch ends (OpenMP's idle threads sleep, ``carseg.threads``). Torch's thread
    count is per OS thread once set there, and is only changed when the choice changes (changing it
    drops oneDNN's cached kernels)."""

    def __init__(self, total: int, executors: int) -> None:
        self.total, self.narrow = max(1, total), max(1, total // executors)

    def choose(self, samples: int, busy: int) -> int:
        return self.total if samples >= WIDE_MIN_SAMPLES and busy <= 1 else self.narrow

    def apply(self, samples: int) -> None:
        want = self.choose(samples, _busy.count())
        if torch.get_num_threads() != want:
            torch.set_num_threads(want)


class Runner:
    def __init__(self, collector: BatchCollector, executor: Executor, idle_timeout_s: float, threads: ThreadShare | None = None) -> None:
        self.collector, self.executor, self.idle_timeout_s, self.threads = collector, executor, idle_timeout_s, threads
        self.stopping = threading.Event()

    def run(self, burst: bool = False) -> None:
        """Serve until ``stop()``; with ``burst``, return once the source has nothing to give. Jobs
        already taken are run before returning: a Redis job taken and left would wait out the
        visibility timeout in this stopped consumer's hands."""
        dirty = False  # batches ran since the last trim
        while not self.stopping.is_set():
            batch = self.collector.next_batch(self.idle_timeout_s)
            if batch:
                self._execute(batch)
                dirty = True
            else:
                if dirty and _busy.none():  # the whole process idle: hand the batches' memory back
                    release_free_memory()
                    dirty = False
                if burst:
                    break
        while batch := self.collector.next_batch(0.0, more=False):
            self._execute(batch)

    def _execute(self, batch: list[Delivery]) -> None:
        # counted busy, so that no other runner of the process trims memory or widens under it, until
        # its last sampler call ends: a job answered then may start the next batch on another runner
        # at once, which must not see this one still busy (it ran a lone k=4 on one thread)
        release = _busy.enter()
        try:
            if self.threads is not None:
                self.threads.apply(sum(d.job.k for d in batch))
            self.executor.execute(batch, computed=release)
        finally:
            release()

    def stop(self) -> None:
        self.stopping.set()


class RunnerThread:
    """A runner in a daemon thread (the in-process queue's consumer)."""

    def __init__(self, runner: Runner, name: str = "carseg-runner") -> None:
        self.runner, self.name = runner, name
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self.runner.stopping.clear()
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        flush_denormals()  # a per-thread flag: the thread that set up the device is not this one
        self.runner.run()

    def stop(self) -> None:
        self.runner.stop()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()


class RunnerPool:
    """Runners side by side in daemon threads over one source (the in-process queue's consumer):
    each takes its own batches, so one runs a sampler call while another collects the next."""

    def __init__(self, runners: list[Runner]) -> None:
        self.threads = [RunnerThread(runner, f"carseg-runner-{i}") for i, runner in enumerate(runners)]

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def stop(self) -> None:
        for thread in self.threads:
            thread.runner.stop()  # all told first, so they finish their batches together
        for thread in self.threads:
            thread.stop()

    def is_alive(self) -> bool:
        return all(thread.is_alive() for thread in self.threads)


def build_runner(
    source: JobSource, models: ModelPool, metrics: Metrics, settings: Settings, idle_timeout_s: float, of: int = 1, threads: ThreadShare | None = None
) -> Runner:
    """The one runner both transports use, with the batch budget and delay of ``settings``; one
    ``of`` runners side by side in a process, each with that share of the sampler's memory budget,
    so that the process keeps to the budget whatever they run at once, and sharing the CPU's
    threads by ``threads``."""
    collector = BatchCollector(source, settings.batch_max_samples, settings.batch_max_delay_ms / 1000, typical_k=settings.default_k)
    executor = Executor(models, metrics, settings.decode_batch, settings.sampler_memory_mb * 2**20 // of)
    return Runner(collector, executor, idle_timeout_s, threads)
