"""A bounded soak of the Redis path: errors, latency and memory growth under steady load, in one run.

    python bench/soak.py [--minutes 10] [--load 0.7] [--api-key KEY] [--json bench/results/soak-cpu.json]

1. Starts, on free loopback ports, a redis-server, ``carseg serve --queue redis`` and two
   ``carseg worker --threads 1`` processes (bench/procs.py), and waits until /health/ready is 200
   and both workers' heartbeats are live.
2. Saturation probe (``--probe-seconds``, 20 s): closed-loop clients (``--probe-concurrency``) post
   the 128x128 LIDC crop to /v1/models/<model>/samples with k cycling through 1, 4, 16; their
   throughput in requests/s is the saturation the soak is sized from.
3. Soak: open-loop Poisson arrivals at ``--load`` (70%) of that throughput, the same k mix, for a
   ``--warmup`` (10 s) and then ``--minutes``. A request is ok when it answers 200 with k masks;
   every other status, a 200 with the wrong number of masks, or an exception is an unexpected
   error, counted by kind and listed (first 20) in the JSON. Latency runs from a request's
   scheduled time, so a queue that builds up shows in it.
4. Every 0.5 s, VmRSS of the API and of each worker (with any children, /proc/PID/status) and
   Redis ``INFO memory`` used_memory; every 10 s from the end of the warm-up to the end of the soak
   a point of the time series in the JSON: those readings then, the least and the most RSS and the
   most used_memory over the 10 s before, and Redis's key count.

Criteria (exit code 1 if one fails): no unexpected error; each process's RSS at the end within 10%
of its RSS at the start, both the floor of the readings in a window: the first and the last tenth
of the soak, 10 s at least (the first point's 10 s are the warm-up's last). A worker's RSS swings
by ~100 MiB between a k=16 batch and an idle instant; what stays resident between batches is what a
leak raises, though the allocator moves it too, by up to ~50 MiB over a minute on a CPU worker, so
read the floors' series before blaming a short run (the JSON has the peaks' growth too). Redis
bounded: used_memory at most 32 MiB above its start at every reading (about 2,000 crops on the
stream), and at most twice offered rate x result_ttl_s keys at the end (an answered job leaves a
marker, and an unread result, until the TTL expires them).

What to read: the PASS/FAIL column, and the RSS series in the JSON where a growth is near the
limit (a one-off step after the warm-up is an allocator settling; a steady slope of the floors is
a leak). Absolute throughput and latency move with the machine's load. The services' stderr logs
stay in the temporary folder the bench prints; their WARNING/ERROR/Traceback lines are counted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import redis

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.footprint import crop_png
from bench.procs import carseg, free_port, process_trees, redis_server, service_arguments, stop
from bench.serve import closed_loop, percentile, wait_ready
from service.config import Settings
from service.queue.redis_protocol import Keys

KS = (1, 4, 16)
RSS_GROWTH_LIMIT = 0.10
REDIS_HEADROOM = 32 * 1024 * 1024
SAMPLE_EVERY_S = 10.0
READ_EVERY_S = 0.5


# -- processes -------------------------------------------------------------------------------------

def start(args: argparse.Namespace, logs: Path) -> tuple[str, int, dict[str, subprocess.Popen], list[subprocess.Popen]]:
    """redis-server, the API and two workers; their names, and every process to stop in order."""
    redis_port, port = free_port(), free_port()
    procs: list[subprocess.Popen] = [redis_server(redis_port)]
    env = {"CARSEG_BATCH_MAX_SAMPLES": str(args.budget), "CARSEG_MODEL_DIR": str(args.model_dir), "CARSEG_DEVICE": args.device,
           "CARSEG_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
           # the soak measures the service, not the per-key rate limit (100/s), which a GPU's saturation passes
           "CARSEG_RATE_LIMIT_PER_S": "0"}
    named: dict[str, subprocess.Popen] = {}
    try:
        api_env = {**env, "CARSEG_API_KEYS": args.api_key} if args.api_key else env
        commands = {"api": (["serve", "--port", str(port), "--queue", "redis"], api_env),
                    "worker1": (["worker", "--threads", "1"], env), "worker2": (["worker", "--threads", "1"], env)}
        for name, (command, command_env) in commands.items():
            fd = log_file(logs, name)
            try:
                named[name] = carseg(command, command_env, stderr=fd)
            finally:
                os.close(fd)
            procs.append(named[name])
        url = f"http://127.0.0.1:{port}"
        try:
            wait_ready(url, procs)
        except RuntimeError as exc:  # stderr goes to files here, not to a pipe wait_ready can read
            raise RuntimeError(f"{exc}\n{log_tails(logs)}") from None
        wait_workers(redis_port, args.model, 2, named)
    except BaseException:
        stop(procs)
        raise
    return url, redis_port, named, procs


def log_file(logs: Path, name: str) -> int:
    # a file, never a pipe: nobody reads a pipe during the soak and a full one would block the process
    return os.open(logs / f"{name}.log", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)


def log_tails(logs: Path, chars: int = 1500) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-chars:]}" for p in sorted(logs.glob("*.log")))


def log_problems(logs: Path) -> dict[str, dict[str, int]]:
    """Per log: lines at WARNING, at ERROR or above, and tracebacks; JSON lines (``"level"``) or text."""
    out = {}
    for p in sorted(logs.glob("*.log")):
        counts = {"Traceback": 0, "ERROR": 0, "WARNING": 0}
        for line in p.read_text(errors="replace").splitlines():
            try:
                level = str(json.loads(line).get("level", "")).upper()
            except (ValueError, AttributeError):
                match = re.search(r"\b(WARNING|ERROR|CRITICAL)\b", line)
                level = match.group(1) if match else ""
            counts["Traceback"] += "Traceback" in line
            counts["ERROR"] += level in ("ERROR", "CRITICAL")
            counts["WARNING"] += level == "WARNING"
        out[p.stem] = counts
    return out


def wait_workers(redis_port: int, model: str, workers: int, named: dict[str, subprocess.Popen], timeout_s: float = 120) -> None:
    """Ready needs one live worker; the soak needs both, or the first would take every job."""
    client, key = redis.Redis(port=redis_port), Keys(Settings().redis_prefix).heartbeats(model)
    deadline = time.monotonic() + timeout_s
    while client.zcount(key, time.time() - Settings().heartbeat_ttl_s, "+inf") < workers:
        dead = [name for name, proc in named.items() if proc.poll() is not None]
        if dead or time.monotonic() > deadline:
            raise RuntimeError(f"{workers} workers never alive (exited: {dead})")
        time.sleep(0.1)  # polling interval


def tree_rss(pids: list[int]) -> list[int]:
    """VmRSS of each of ``pids`` together with all its descendants, in bytes (one pass over /proc)."""
    totals = []
    for tree in process_trees(pids):
        total = 0
        for p in tree:
            try:
                for line in Path(f"/proc/{p}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
            except OSError:
                pass
        totals.append(total)
    return totals


def reading(named: dict[str, subprocess.Popen], client: redis.Redis) -> dict:
    return {"rss": dict(zip(named, tree_rss([proc.pid for proc in named.values()]), strict=True)),
            "redis_used_memory": int(client.info("memory")["used_memory"]), "redis_keys": int(client.dbsize())}


class Sampler:
    """Reads every ``READ_EVERY_S`` and keeps a point every ``SAMPLE_EVERY_S``: the reading then, and
    the least and the most of the readings since the last point. A worker's RSS swings by ~100 MiB
    between a k=16 batch and an idle moment (its allocator returns a batch's buffers), so one
    instant against another, or one window's peak against another's (which batch mix it caught),
    says little; the floor, what stays resident between batches, is steady to the MiB, and a leak
    raises it."""

    def __init__(self, named: dict[str, subprocess.Popen], client: redis.Redis) -> None:
        self.named, self.client = named, client
        self.series: list[dict] = []
        self._window: list[dict] = []

    def read(self) -> dict:
        now = reading(self.named, self.client)
        self._window.append(now)
        return now

    def point(self, t: float) -> None:
        now, window = self.read(), self._window
        self.series.append({
            "t_s": round(t, 1), **now, "readings": len(window),
            "rss_min": {name: min(r["rss"][name] for r in window) for name in self.named},
            "rss_max": {name: max(r["rss"][name] for r in window) for name in self.named},
            "redis_used_memory_max": max(r["redis_used_memory"] for r in window),
        })
        self._window = []


# -- load ------------------------------------------------------------------------------------------

def client(args: argparse.Namespace, connections: int) -> httpx.AsyncClient:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    return httpx.AsyncClient(timeout=120, headers=headers, limits=httpx.Limits(max_connections=connections, max_keepalive_connections=connections))


async def post(http: httpx.AsyncClient, endpoint: str, data: bytes, k: int, seed: int) -> tuple[str, str]:
    """One request: ("ok", "") or (error kind, detail)."""
    try:
        r = await http.post(endpoint, files={"image": ("img.png", data)}, params={"k": k, "seed": seed})
    except Exception as exc:  # any exception is an error to count, not to raise
        return type(exc).__name__, str(exc)[:200]
    if r.status_code != 200:
        return str(r.status_code), r.text[:200]
    try:
        masks = len(r.json()["masks"])
    except (ValueError, KeyError, TypeError) as exc:
        return "200-bad-body", f"{type(exc).__name__}: {r.text[:200]}"
    return ("ok", "") if masks == k else ("200-wrong-masks", f"k={k}, {masks} masks")


async def saturation(args: argparse.Namespace, endpoint: str, data: bytes) -> dict:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else None
    r = await closed_loop(endpoint, data, KS, args.probe_concurrency, args.probe_seconds, headers)
    return {"seconds": r["seconds"], "concurrency": args.probe_concurrency, "ok": r["requests"], "errors": r["errors"],
            "requests_per_s": r["images_per_s"]}


async def soak(args: argparse.Namespace, endpoint: str, data: bytes, rate: float, named: dict[str, subprocess.Popen], rclient: redis.Redis) -> dict:
    rng = random.Random(args.seed + 1)
    loop = asyncio.get_running_loop()
    warmup, seconds = args.warmup, 60 * args.minutes
    records: list[tuple[float, str, float]] = []  # scheduled time from t0, outcome, latency
    details: list[dict] = []
    sampler = Sampler(named, rclient)
    tasks: set[asyncio.Task] = set()

    async def one(scheduled: float, k: int, seed: int) -> None:
        outcome, detail = await post(http, endpoint, data, k, seed)
        records.append((scheduled - t0, outcome, loop.time() - scheduled))
        if outcome != "ok" and len(details) < 20:
            details.append({"t_s": round(scheduled - t0, 2), "k": k, "error": outcome, "detail": detail})

    async def sampling() -> None:
        # points every SAMPLE_EVERY_S from the end of the warm-up (the first one's window covers the
        # warm-up's last SAMPLE_EVERY_S), reads every READ_EVERY_S between; soak() takes the end point
        end = warmup + seconds - READ_EVERY_S
        points = [warmup + n * SAMPLE_EVERY_S for n in range(math.ceil((end - warmup) / SAMPLE_EVERY_S))]
        reads = [i * READ_EVERY_S for i in range(math.ceil(end / READ_EVERY_S))]
        reads = [t for t in reads if t >= warmup - SAMPLE_EVERY_S and all(abs(t - p) >= READ_EVERY_S / 2 for p in points)]
        for at, is_point in sorted([(t, True) for t in points] + [(t, False) for t in reads]):
            await asyncio.sleep(max(0.0, t0 + at - loop.time()))
            if is_point:
                await asyncio.to_thread(sampler.point, loop.time() - t0 - warmup)
            else:
                await asyncio.to_thread(sampler.read)

    async with client(args, args.max_connections) as http:
        t0 = loop.time()
        sampled = asyncio.create_task(sampling())
        next_at, i = t0, 0
        while next_at < t0 + warmup + seconds:
            await asyncio.sleep(max(0.0, next_at - loop.time()))
            task = asyncio.create_task(one(next_at, rng.choice(KS), 10_000_000 + i))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            i += 1
            next_at += rng.expovariate(rate)
        await sampled
        await asyncio.sleep(max(0.0, t0 + warmup + seconds - loop.time()))
        await asyncio.to_thread(sampler.point, loop.time() - t0 - warmup)
        in_flight_at_end = len(tasks)
        drain0 = loop.time()
        if tasks:
            await asyncio.gather(*tasks)
        drain_s = loop.time() - drain0
    drained = {"t_s": round(loop.time() - t0 - warmup, 1), **await asyncio.to_thread(reading, named, rclient)}

    window = [r for r in records if r[0] >= warmup]
    ok_lat = [lat for _, outcome, lat in window if outcome == "ok"]
    by_kind: dict[str, int] = {}
    for _, outcome, _ in records:
        if outcome != "ok":
            by_kind[outcome] = by_kind.get(outcome, 0) + 1
    return {
        "warmup_s": warmup, "seconds": seconds, "offered_requests_per_s": rate,
        "sent": len(records), "ok": sum(outcome == "ok" for _, outcome, _ in records), "errors": sum(by_kind.values()),
        "errors_by_kind": by_kind, "error_examples": details,
        "window": {"sent": len(window), "ok": len(ok_lat), "sent_per_s": len(window) / seconds, "ok_per_s": len(ok_lat) / seconds,
                   "p50_ms": 1000 * percentile(ok_lat, 50), "p95_ms": 1000 * percentile(ok_lat, 95),
                   "p99_ms": 1000 * percentile(ok_lat, 99), "max_ms": 1000 * max(ok_lat, default=float("nan"))},
        "in_flight_at_end": in_flight_at_end, "drain_s": drain_s, "series": sampler.series, "after_drain": drained,
    }


# -- report ----------------------------------------------------------------------------------------

def criteria(result: dict, names: list[str], result_ttl_s: float) -> dict[str, dict]:
    series, out = result["series"], {}
    out["no unexpected errors"] = {"value": result["errors"], "limit": 0, "pass": result["errors"] == 0}
    first, last = series[0], series[-1]
    # the floor over the first and the last tenth of the soak (10 s at least): 60 s in 10 minutes
    edge = max(1, round(result["seconds"] / 10 / SAMPLE_EVERY_S))
    head, tail = series[:edge], series[-edge:]
    for name in names:
        start, end = min(s["rss_min"][name] for s in head), min(s["rss_min"][name] for s in tail)
        out[f"{name} RSS growth"] = {"start": start, "end": end, "max": max(s["rss_max"][name] for s in series), "growth": end / start - 1,
                                     "window_s": edge * SAMPLE_EVERY_S,
                                     "peak_growth": max(s["rss_max"][name] for s in tail) / max(s["rss_max"][name] for s in head) - 1,
                                     "limit": RSS_GROWTH_LIMIT, "pass": end / start - 1 < RSS_GROWTH_LIMIT}
    used = [s["redis_used_memory"] for s in series]
    peak = max(s["redis_used_memory_max"] for s in series)
    out["redis used_memory bounded"] = {"start": used[0], "end": used[-1], "max": peak, "limit": used[0] + REDIS_HEADROOM,
                                        "pass": peak <= used[0] + REDIS_HEADROOM}
    key_limit = math.ceil(2 * result["offered_requests_per_s"] * result_ttl_s) + 100
    out["redis keys bounded"] = {"start": first["redis_keys"], "end": last["redis_keys"], "max": max(s["redis_keys"] for s in series),
                                 "limit": key_limit, "pass": last["redis_keys"] <= key_limit}
    return out


def mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def print_report(args: argparse.Namespace, sat: dict, result: dict, crit: dict, problems: dict, logs: Path) -> None:
    w = result["window"]
    print(f"\ncarseg soak: {args.model} on {args.device} ({platform.processor() or platform.machine()}, {os.cpu_count()} cpus), "
          f"redis path, 2 workers x 1 thread, k in {KS}, 128x128 LIDC crop")
    rows = [
        ("saturation probe", f"{sat['requests_per_s']:.2f} req/s ({sat['concurrency']} closed-loop clients, {sat['seconds']:.0f} s, {sat['errors']} errors)"),
        ("duration", f"{result['warmup_s']:.0f} s warm-up + {result['seconds'] / 60:g} min soak"),
        ("offered rate", f"{result['offered_requests_per_s']:.2f} req/s ({args.load:.0%} of saturation, Poisson)"),
        ("achieved throughput", f"{w['ok_per_s']:.2f} req/s ok ({w['ok_per_s'] / result['offered_requests_per_s']:.0%} of offered; "
                                f"sent {w['sent_per_s']:.2f} req/s)"),
        ("latency p50/p95/p99", f"{w['p50_ms']:.0f} / {w['p95_ms']:.0f} / {w['p99_ms']:.0f} ms (max {w['max_ms']:.0f} ms)"),
        ("requests", f"{result['sent']} sent, {result['ok']} ok, {result['errors']} errors {result['errors_by_kind'] or ''}"),
        ("in flight at end", f"{result['in_flight_at_end']} (drained in {result['drain_s']:.1f} s)"),
    ]
    for label, text in rows:
        print(f"  {label:<22} {text}")
    window = next(c["window_s"] for c in crit.values() if "window_s" in c)
    print(f"\n  RSS start/end: the floor of the readings (every {READ_EVERY_S:g} s) in the first and the last {window:g} s; "
          "max: the highest reading. Redis start/end: instants; max: the highest reading")
    print(f"  {'criterion':<26} {'start':>11} {'end':>11} {'max':>11} {'growth':>8} {'limit':>11}  result")
    for name, c in crit.items():
        if name == "no unexpected errors":
            print(f"  {name:<26} {'':>11} {c['value']:>11} {'':>11} {'':>8} {c['limit']:>11}  {'PASS' if c['pass'] else 'FAIL'}")
        elif "RSS" in name:
            print(f"  {name:<26} {mib(c['start']):>11} {mib(c['end']):>11} {mib(c['max']):>11} {c['growth']:>+8.1%} {'<' + format(c['limit'], '.0%'):>11}  "
                  f"{'PASS' if c['pass'] else 'FAIL'}")
        elif "used_memory" in name:
            print(f"  {name:<26} {mib(c['start']):>11} {mib(c['end']):>11} {mib(c['max']):>11} {c['end'] / c['start'] - 1:>+8.1%} "
                  f"{mib(c['limit']):>11}  {'PASS' if c['pass'] else 'FAIL'}")
        else:
            print(f"  {name:<26} {c['start']:>11} {c['end']:>11} {c['max']:>11} {'':>8} {c['limit']:>11}  {'PASS' if c['pass'] else 'FAIL'}")
    if result["error_examples"]:
        print("\n  first errors:")
        for e in result["error_examples"][:5]:
            print(f"    t={e['t_s']} s k={e['k']}: {e['error']} {e['detail'][:120]}")
    print(f"\n  service logs ({logs}): " + "; ".join(f"{name} " + ", ".join(f"{n} {w}" for w, n in c.items()) for name, c in problems.items()))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0, help="soak length after the warm-up")
    parser.add_argument("--warmup", type=float, default=10.0, help="seconds of load before the start sample")
    parser.add_argument("--load", type=float, default=0.7, help="offered rate as a fraction of the probed saturation")
    parser.add_argument("--probe-seconds", type=float, default=20.0)
    parser.add_argument("--probe-concurrency", type=int, default=8)
    parser.add_argument("--max-connections", type=int, default=256, help="the soak client's connection pool")
    service_arguments(parser, "soak-cpu.json")
    parser.add_argument("--budget", type=int, default=16, help="CARSEG_BATCH_MAX_SAMPLES")
    parser.add_argument("--seed", type=int, default=0, help="k mix and arrival times")
    parser.add_argument("--api-key", help="send Authorization: Bearer KEY, and start the API with CARSEG_API_KEYS=KEY")
    args = parser.parse_args()

    data = crop_png()
    logs = Path(tempfile.mkdtemp(prefix="carseg-soak-"))
    url, redis_port, named, procs = start(args, logs)
    endpoint = f"{url}/v1/models/{args.model}/samples"
    try:
        asyncio.run(saturation(argparse.Namespace(**{**vars(args), "probe_seconds": 3.0}), endpoint, data))  # warm-up
        sat = asyncio.run(saturation(args, endpoint, data))
        if sat["requests_per_s"] <= 0:
            raise RuntimeError(f"saturation probe answered nothing: {sat}\n{log_tails(logs)}")
        rate = args.load * sat["requests_per_s"]
        result = asyncio.run(soak(args, endpoint, data, rate, named, redis.Redis(port=redis_port)))
        exited = {name: proc.returncode for name, proc in named.items() if proc.poll() is not None}
    finally:
        # the services first, with Redis still up, so that workers leave as they would in production
        try:
            stop(procs[1:])
        finally:
            stop(procs[:1])
    problems = log_problems(logs)
    crit = criteria(result, list(named), Settings().result_ttl_s)
    if exited:
        crit["processes alive at end"] = {"start": len(named), "end": len(named) - len(exited), "max": len(named), "limit": len(named), "pass": False}
    print_report(args, sat, result, crit, problems, logs)
    passed = all(c["pass"] for c in crit.values())
    out = {
        "device": args.device, "cpus": os.cpu_count(), "model": args.model, "ks": KS, "load": args.load, "budget": args.budget,
        "workers": 2, "worker_threads": 1, "saturation": sat, "soak": result, "criteria": crit, "pass": passed,
        "exited": exited, "log_problems": problems, "logs": str(logs),
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    print(f"\n{'PASS' if passed else 'FAIL'}; wrote {args.json}")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
