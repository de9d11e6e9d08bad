"""How many CPU threads a ``carseg`` process computes with, and how its idle threads wait.

OpenMP (torch's CPU pool, MKL's) sizes its pool from ``OMP_NUM_THREADS`` (default: every core of
the machine, not the cores the process may use) and by default lets idle threads spin for a while
before they sleep. Processes that share cores (two workers and the API on one host, a container with
a CPU limit) then burn their share of the cores spinning: on a 2-core machine, two workers and the
API served 3.1 req/s with the default settings, 15.4 with ``OMP_WAIT_POLICY=PASSIVE`` and 16.0
with ``OMP_NUM_THREADS=1`` (issue 9). ``configure`` therefore sets the thread count from the cores
this process may use and makes idle threads sleep, unless the user chose otherwise.

OpenMP reads these variables once, when torch loads it: ``configure`` must run before torch is
imported, which is why this module does not import torch itself.
"""

from __future__ import annotations

import logging
import math
import os
import sys
from pathlib import Path

log = logging.getLogger(__name__)

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
WAIT_POLICY = "OMP_WAIT_POLICY"


def _affinity() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # no sched_getaffinity (macOS)
        return os.cpu_count() or 1


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _own_cgroups(proc_cgroup: Path) -> list[str]:
    """This process's cgroup paths from ``/proc/self/cgroup``: the v2 one (``0::/path``) and the v1
    one of the cpu controller (``N:cpu,cpuacct:/path``)."""
    paths = []
    for line in (_read(proc_cgroup) or "").splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3 and (parts[1] == "" or "cpu" in parts[1].split(",")):
            paths.append(parts[2])
    return paths


def _quota(directory: Path) -> float | None:
    """The CPU quota of one cgroup folder in cores: v2 ``cpu.max`` ("QUOTA PERIOD" or "max PERIOD"),
    else v1 ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us`` (quota -1: none). None: no limit there."""
    v2 = _read(directory / "cpu.max")
    if v2 is not None:
        fields = v2.split()
        if fields and fields[0] != "max":
            try:
                period = float(fields[1]) if len(fields) > 1 else 100000.0
                return float(fields[0]) / period if period > 0 else None
            except ValueError:
                return None
        return None
    quota, period = _read(directory / "cpu.cfs_quota_us"), _read(directory / "cpu.cfs_period_us")
    if quota is None or period is None:
        return None
    try:
        q, p = float(quota), float(period)
    except ValueError:
        return None
    return q / p if q > 0 and p > 0 else None


def cgroup_cpu_limit(cgroup_root: Path | str = CGROUP_ROOT, proc_cgroup: Path | str = PROC_CGROUP) -> float | None:
    """The tightest CPU quota (in cores) over this process's cgroup and its ancestors, under the v2
    root or the v1 ``cpu`` hierarchy; None where no quota is set. In a container the cgroup is
    usually the mount's root itself, which is always checked."""
    root = Path(cgroup_root)
    bases = [root, root / "cpu", root / "cpu,cpuacct"]
    folders: list[Path] = []
    for base in bases:
        for own in _own_cgroups(Path(proc_cgroup)):
            if ".." in own:  # a cgroup outside this namespace's view: only the root is ours to read
                continue
            folder = base / own.lstrip("/")
            while folder != base and base in folder.parents:
                folders.append(folder)
                folder = folder.parent
        folders.append(base)
    quotas = [q for q in (_quota(folder) for folder in dict.fromkeys(folders)) if q is not None]
    return min(quotas) if quotas else None


def available_cores(cgroup_root: Path | str = CGROUP_ROOT, proc_cgroup: Path | str = PROC_CGROUP) -> int:
    """The cores this process may use: its CPU affinity (``taskset``, ``docker --cpuset-cpus``),
    bounded by its cgroup's CPU quota (``docker --cpus``, a Kubernetes CPU limit) rounded up; at
    least 1."""
    cores = _affinity()
    limit = cgroup_cpu_limit(cgroup_root, proc_cgroup)
    if limit is not None:
        cores = min(cores, math.ceil(limit))
    return max(1, cores)


def configure(threads: int | None = None) -> dict[str, str]:
    """Set the CPU threads and OpenMP wait policy of this process, before torch is imported.

    ``OMP_NUM_THREADS`` and ``MKL_NUM_THREADS``: ``threads`` when given (``--threads`` wins over the
    environment), else what the user set (one of the two set gives both its value), else
    ``available_cores()``.
    ``OMP_WAIT_POLICY``: the environment's, else ``PASSIVE`` (idle threads sleep instead of spinning
    on cores other processes need). Returns the values now in force.

    If torch is already loaded, its OpenMP pool has read the environment already: the thread count
    is still applied with ``torch.set_num_threads``, but the wait policy only reaches child processes
    (a warning says so).
    """
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be at least 1, not {threads}")
    user = next((os.environ[var] for var in THREAD_VARS if os.environ.get(var)), None)
    if threads is not None:
        value, source = str(threads), "--threads"
    elif user is not None:
        value, source = user, "environment"
    else:
        value, source = str(available_cores()), "available cores"
    result: dict[str, str] = {}
    for var in THREAD_VARS:
        # both, and alike: torch sets its OpenMP count from MKL's when it loads, so a lone
        # OMP_NUM_THREADS=1 would otherwise lose to an MKL_NUM_THREADS of all the cores
        if threads is not None or not os.environ.get(var):
            os.environ[var] = value
        result[var] = os.environ[var]
    policy_set_here = not os.environ.get(WAIT_POLICY)
    if policy_set_here:
        os.environ[WAIT_POLICY] = "PASSIVE"
    result[WAIT_POLICY] = os.environ[WAIT_POLICY]
    log.info("CPU threads %s (%s), %s=%s", result["OMP_NUM_THREADS"], source, WAIT_POLICY, result[WAIT_POLICY])

    if "torch" in sys.modules:
        import torch

        try:
            torch.set_num_threads(int(result["OMP_NUM_THREADS"]))
        except ValueError:  # e.g. a nested list "4,2": leave torch's count as OpenMP read it
            pass
        if policy_set_here:
            log.warning("torch was imported before the CPU threads were configured: %s=PASSIVE applies to child processes only", WAIT_POLICY)
    return result
