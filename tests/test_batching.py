"""The batch collector on a scripted source: budget split, carry-over, the count it asks for and
its closing delay."""

from dataclasses import dataclass, field

from service.runner.batching import BatchCollector
from service.runner.loop import Runner
from tests.queue_backends import make_job


@dataclass
class Delivered:
    job: object


@dataclass
class ScriptedSource:
    """Jobs waiting in order; each take hands out up to max_jobs of them and records what it was asked."""

    ks: list[int]
    asked: list[tuple[float, int]] = field(default_factory=list)

    def take(self, timeout_s: float, max_jobs: int) -> list[Delivered]:
        self.asked.append((timeout_s, max_jobs))
        taken, self.ks = self.ks[:max_jobs], self.ks[max_jobs:]
        return [Delivered(make_job(k=k, seed=i)) for i, k in enumerate(taken)]


def batches(collector: BatchCollector) -> list[list[int]]:
    out = []
    while batch := collector.next_batch(idle_timeout_s=0.0):
        out.append([d.job.k for d in batch])
    return out


def test_budget_split_carries_the_overflowing_job_into_the_next_batch():
    source = ScriptedSource([4, 4, 4, 8, 2, 1])
    assert batches(BatchCollector(source, max_samples=10, max_delay_s=0.0, typical_k=1)) == [[4, 4], [4], [8, 2], [1]]


def test_a_job_over_the_budget_is_a_batch_of_its_own_and_order_is_kept():
    source = ScriptedSource([3, 20, 3, 3])
    assert batches(BatchCollector(source, max_samples=16, max_delay_s=0.0, typical_k=16)) == [[3], [20], [3, 3]]


def test_a_carried_job_opens_the_next_batch_without_waiting_for_the_source():
    source = ScriptedSource([6, 6])
    collector = BatchCollector(source, max_samples=8, max_delay_s=0.0, typical_k=8)
    assert [d.job.k for d in collector.next_batch(idle_timeout_s=0.0)] == [6]
    calls = len(source.asked)
    # the second 6 was taken to fill the rest of the budget and carried over: the next batch starts
    # from it, with no idle wait on the source
    assert [d.job.k for d in collector.next_batch(idle_timeout_s=30.0)] == [6]
    assert all(timeout < 30.0 for timeout, _ in source.asked[calls:])


def test_it_asks_for_about_what_the_rest_of_the_budget_holds_at_the_recent_mean_k():
    source = ScriptedSource([8] * 20)
    collector = BatchCollector(source, max_samples=16, max_delay_s=0.0, typical_k=16)
    for _ in range(6):
        collector.next_batch(idle_timeout_s=0.0)
    # first ask: 16 / 16 = 1 job; once the recent jobs are all k = 8, 16 / 8 = 2
    assert source.asked[0][1] == 1 and source.asked[-1][1] == 2
    # and with the budget half used, 8 / 8 = 1
    assert (0.0, 1) in source.asked[1:]


def test_the_batch_closes_after_the_delay_when_the_budget_is_not_full():
    source = ScriptedSource([1])
    collector = BatchCollector(source, max_samples=16, max_delay_s=0.05, typical_k=1)
    assert [d.job.k for d in collector.next_batch(idle_timeout_s=1.0)] == [1]
    first, *rest = source.asked
    assert first[0] == 1.0  # the first job is waited for as long as the idle timeout
    assert rest and all(timeout <= 0.05 for timeout, _ in rest)  # the rest only until the batch closes
    assert collector.next_batch(idle_timeout_s=0.0) == []


@dataclass
class ArrivingSource:
    """Jobs that have arrived, ``gap_s`` apart by their enqueue times; a take hands out those that
    are there (nothing arrives while the collector waits) and records its timeout."""

    gap_s: float
    ready: list[Delivered] = field(default_factory=list)
    arrived: int = 0
    asked: list[float] = field(default_factory=list)

    def arrive(self, n: int) -> None:
        for _ in range(n):
            job = make_job(k=1, seed=self.arrived)
            job.enqueued = 1000.0 + self.arrived * self.gap_s
            self.ready.append(Delivered(job))
            self.arrived += 1

    def take(self, timeout_s: float, max_jobs: int) -> list[Delivered]:
        self.asked.append(timeout_s)
        taken, self.ready = self.ready[:max_jobs], self.ready[max_jobs:]
        return taken

    def waits_of_next_batch(self, collector: BatchCollector, jobs: int) -> list[float]:
        """The timeouts of the takes that filled a batch after its first job, ``jobs`` having arrived."""
        self.arrive(jobs)
        asked = len(self.asked)
        assert len(collector.next_batch(idle_timeout_s=0.0)) == jobs
        return self.asked[asked + 1:]


def test_the_batch_closes_at_once_when_no_job_is_expected_within_the_delay():
    # a job every 4 s and a 0.2 s delay (one client, k = 1: every 40 ms against 2 ms), so a batch
    # does not wait for a second job
    source = ArrivingSource(gap_s=4.0)
    collector = BatchCollector(source, max_samples=16, max_delay_s=0.2, typical_k=1)
    first = source.waits_of_next_batch(collector, 1)
    assert len(first) == 1 and 0.0 < first[0] <= 0.2  # no arrival rate known yet: it waits, as before
    for _ in range(3):
        assert source.waits_of_next_batch(collector, 1) == [0.0]  # one look at the queue, no wait


def test_one_job_enqueued_long_ago_does_not_stop_the_batching():
    # jobs 1 ms apart, but one of them stamped an hour early (reclaimed, or a replica's clock off)
    source = ArrivingSource(gap_s=0.001)
    collector = BatchCollector(source, max_samples=16, max_delay_s=0.05, typical_k=1)
    source.arrive(1)
    source.ready[0].job.enqueued -= 3600.0
    source.arrive(3)
    collector.next_batch(idle_timeout_s=0.0)
    waits = source.waits_of_next_batch(collector, 4)
    assert len(waits) == 1 and 0.0 < waits[0] <= 0.05


def test_the_batch_waits_the_delay_when_jobs_are_expected_within_it():
    # jobs 1 ms apart and a 50 ms delay: about 50 are expected within it, so the batch stays open
    source = ArrivingSource(gap_s=0.001)
    collector = BatchCollector(source, max_samples=16, max_delay_s=0.05, typical_k=1)
    for _ in range(2):
        waits = source.waits_of_next_batch(collector, 4)
        assert len(waits) == 1 and 0.0 < waits[0] <= 0.05


def test_no_delay_never_waits():
    source = ArrivingSource(gap_s=0.001)
    collector = BatchCollector(source, max_samples=16, max_delay_s=0.0, typical_k=1)
    assert source.waits_of_next_batch(collector, 1) == [0.0]


def test_draining_batches_what_was_taken_without_asking_the_source():
    source = ScriptedSource([6, 6, 6])
    collector = BatchCollector(source, max_samples=8, max_delay_s=0.0, typical_k=8)
    collector.next_batch(idle_timeout_s=0.0)  # runs the first 6, carries the second
    asked = len(source.asked)
    assert [d.job.k for d in collector.next_batch(idle_timeout_s=0.0, more=False)] == [6]
    assert collector.next_batch(idle_timeout_s=0.0, more=False) == [] and len(source.asked) == asked


class Recorder:
    def __init__(self, runner_box):
        self.batches, self.runner_box = [], runner_box

    def execute(self, batch, computed=None):
        self.batches.append([d.job.k for d in batch])
        self.runner_box[0].stop()  # a stop arrives while the first batch runs


def test_a_stopped_runner_runs_the_jobs_it_already_took():
    # a Redis job taken and left behind would wait out the visibility timeout in a dead consumer's hands
    source = ScriptedSource([6, 6, 6])
    box = []
    executor = Recorder(box)
    runner = Runner(BatchCollector(source, max_samples=8, max_delay_s=0.0, typical_k=8), executor, idle_timeout_s=0.0)
    box.append(runner)
    runner.run()
    assert executor.batches == [[6], [6]] and source.ks == [6]  # the carried job ran; the untaken one stays queued
