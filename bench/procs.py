"""Processes the benchmarks start and stop: `carseg` commands of a checkout and a redis-server,
each on a free loopback port."""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import redis

REPO = Path(__file__).resolve().parents[1]


def service_arguments(parser: argparse.ArgumentParser, results: str) -> None:
    """The flags every service bench takes: which model it serves on which device, and where the
    JSON goes (``bench/results/RESULTS``)."""
    parser.add_argument("--model-dir", default=str(REPO / "models"))
    parser.add_argument("--model", default="default")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", default=str(REPO / "bench" / "results" / results))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def logged(args: list[str], env: dict[str, str], repo: Path = REPO) -> subprocess.Popen:
    """``carseg ARGS`` with its log in a file (``proc.log_path``): a pipe nobody reads fills with
    access lines and stalls the server after a few hundred requests."""
    import tempfile

    log = tempfile.NamedTemporaryFile(prefix="carseg-", suffix=".log", delete=False)
    proc = carseg(args, env, repo, stderr=log.fileno())
    log.close()
    proc.log_path = log.name  # type: ignore[attr-defined]
    return proc


def log_tail(proc: subprocess.Popen, chars: int = 2000) -> str:
    path = getattr(proc, "log_path", None)
    return Path(path).read_text(errors="replace")[-chars:] if path else ""


def carseg(args: list[str], env: dict[str, str], repo: Path = REPO, stderr: int = subprocess.DEVNULL) -> subprocess.Popen:
    """``carseg ARGS`` of the checkout ``repo``: ``-m carseg`` where it has the package, else the
    module older checkouts had, so that a bench can measure the code before a change too."""
    module = "carseg" if (repo / "carseg" / "__main__.py").exists() else "service.cli"
    return subprocess.Popen([sys.executable, "-m", module, *args], cwd=repo, env={**os.environ, "PYTHONPATH": str(repo), **env},
                            stdout=subprocess.DEVNULL, stderr=stderr)


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (the peak) of a process, in bytes."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) * 1024
    return out


def process_trees(pids: list[int]) -> list[list[int]]:
    """Each of ``pids`` with every process descended from it (one pass over /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    trees = []
    for pid in pids:
        tree, todo = [], [pid]
        while todo:
            p = todo.pop()
            tree.append(p)
            todo += children.get(p, [])
        trees.append(tree)
    return trees


def redis_server(port: int) -> subprocess.Popen:
    """A redis-server without persistence on ``port``, answering PING when this returns."""
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--save", "", "--appendonly", "no"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client, deadline = redis.Redis(port=port), time.monotonic() + 10
    while True:
        try:
            client.ping()
            return proc
        except redis.ConnectionError:
            if time.monotonic() > deadline:
                stop([proc])
                raise
            time.sleep(0.02)  # polling interval


def stop(procs: list[subprocess.Popen]) -> None:
    for proc in reversed(procs):
        if proc.poll() is None:
            proc.terminate()
    for proc in procs:
        proc.wait(timeout=30)
