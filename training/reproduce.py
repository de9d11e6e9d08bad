"""``carseg reproduce``: the method's evidence, end to end, on data whose truth is known.

Trains CAR, CAR without L_cal and the peer method (SSN) with the same budget on each synthetic set,
builds the baselines that need no training (independent per-pixel sampling from CAR's p_F, and
k copies of argmax p_F), evaluates all five with ``training.evaluate`` (one code path for every
method), runs the paper's 1D toy with and without L_cal, and writes ``report.md``, figures and
``results.json`` into the output folder. ``--quick`` is the same pipeline on a budget that fits
10 minutes of this 2-core machine; the full budget fits 2 hours. Trainings run two at a time, a
core each (``_run_lanes``).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import redirect_stderr
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from training.baselines import baseline
from training.checkpoint import load_model
from training.config import TrainConfig
from training.data import open_dataset
from training.evaluate import Evaluation, evaluate, sample_case
from training.figure import FIGURE_OUTPUTS, case_row, reliability_tile, save_figure
from training.sampling import Networks, use_device
from training.toy1d import FULL, PI_TRUE, QUICK, ToyConfig, ToyModel, ToyResult, run_toy, save_toy_figure
from training.train import train
from training.train_ssn import train_ssn

METHODS = ("car", "no_cal", "independent", "deterministic", "ssn")
TRAINED = ("car", "no_cal", "ssn")  # the others are built on CAR's F (training.baselines)
# what each method is, for the report
DESCRIPTIONS = {
    "car": "CAR: F + G with L_adv and L_cal (ours, the defaults of `carseg train`)",
    "no_cal": "CAR without L_cal (lambda_cal = 0), same budget",
    "independent": "each pixel drawn independently from CAR's p_F",
    "deterministic": "k copies of argmax p_F (a single-mask model)",
    "ssn": "Stochastic Segmentation Networks (Monteiro et al. 2020), same budget",
}
# the columns of the report's tables, in order: the metric names of `carseg evaluate`
COLUMNS = (
    "ged_16", "ged_100", "ged_truth_16", "hm_iou_16", "diversity_16", "ece", "ece_samples",
    "calibration_error", "event_calibration_error", "event_calibration_floor", "coherence",
    "pair_correlation", "pair_dependence", "pair_dependence_floor",
)


@dataclass(frozen=True)
class DataBudget:
    """One synthetic set: the training minutes each trained method gets, its crop size and how
    many held-out cases judge it."""

    name: str
    minutes: float
    size: int | None
    cases: int


@dataclass(frozen=True)
class Plan:
    name: str
    datasets: tuple[DataBudget, ...]
    toy: ToyConfig
    n_large: int | None  # GED_100 where set
    val_every_s: float


QUICK_PLAN = Plan(
    name="quick",
    datasets=(DataBudget("halo", 2.0, 64, 48), DataBudget("flips", 1.5, None, 48)),
    toy=QUICK, n_large=None, val_every_s=1e9,  # validated once, at the end: validations would eat the budget
)
FULL_PLAN = Plan(
    name="full",
    datasets=(DataBudget("halo", 25.0, 64, 100), DataBudget("flips", 15.0, None, 100)),
    toy=FULL, n_large=100, val_every_s=180.0,
)


def _train_one(method: str, data: DataBudget, out: Path, plan: Plan, device: str, threads: int) -> Path:
    """One trained method on one data set, in a worker process of its own: its log goes to a file,
    as the lanes' progress bars would interleave. Returns the version folder."""
    use_device(device, threads)
    folder = out / "models" / data.name
    folder.mkdir(parents=True, exist_ok=True)
    config = TrainConfig(
        data=f"synthetic:{data.name}", out=folder / method, minutes=data.minutes, size=data.size,
        device=device, val_every_s=plan.val_every_s, val_cases=min(48, data.cases),
    )
    with (folder / f"{method}.log").open("w") as log, redirect_stderr(log):
        if method == "ssn":
            return train_ssn(config)
        return train(replace(config, lambda_cal=0.0) if method == "no_cal" else config)


def _run_lanes(plan: Plan, out: Path, device: str, lanes: int) -> tuple[dict[tuple[str, str], Path], dict[str, tuple[ToyModel, ToyResult]]]:
    """Every training job of the plan, ``lanes`` at a time (one CPU thread each, the longest
    first): on a 2-core machine two single-thread trainings make more steps together than one with
    two threads. Returns the version folder of each (data set, method) and the toy's two runs."""
    threads = max(1, (os.cpu_count() or 1) // lanes) if device == "cpu" else 0
    context = multiprocessing.get_context("spawn")  # a fresh interpreter: no forked torch thread pools
    jobs = sorted(((d, m) for d in plan.datasets for m in TRAINED), key=lambda job: -job[0].minutes)
    versions: dict[tuple[str, str], Path] = {}
    toy: dict[str, tuple[ToyModel, ToyResult]] = {}
    with ProcessPoolExecutor(lanes, mp_context=context) as pool, tqdm(total=len(jobs) + 2, unit="job", desc="train") as bar:
        toy_configs = {"car": plan.toy, "no_cal": replace(plan.toy, lambda_cal=0.0)}
        toy_futures = {label: pool.submit(run_toy, config) for label, config in toy_configs.items()}
        futures = {pool.submit(_train_one, m, d, out, plan, device, threads): (d.name, m) for d, m in jobs}
        for future in as_completed([*toy_futures.values(), *futures]):
            if future in futures:
                versions[futures[future]] = future.result()
            bar.update(1)
            bar.set_postfix_str(" ".join(f"{d}/{m}" for d, m in versions), refresh=True)
        toy = {label: future.result() for label, future in toy_futures.items()}
    return versions, toy


def _samplers(versions: dict[str, Path], device: str) -> dict[str, Networks]:
    car = load_model(versions["car"], device).networks
    return {
        "car": car,
        "no_cal": load_model(versions["no_cal"], device).networks,
        "independent": baseline(car, "independent"),
        "deterministic": baseline(car, "deterministic"),
        "ssn": load_model(versions["ssn"], device).networks,
    }


def _figures(name: str, samplers: dict[str, Networks], results: dict[str, Evaluation], out: Path) -> list[str]:
    """Per method, the first cases' samples, with every method's reliability diagram below."""
    dataset = open_dataset(f"synthetic:{name}", "test", length=3)
    tiles = [reliability_tile(r.reliability["samples"], method) for method, r in results.items() if "samples" in r.reliability]
    files = []
    for method, networks in samplers.items():
        rows = [case_row(dataset[i], sample_case(networks, dataset[i], 16, i, FIGURE_OUTPUTS)) for i in range(len(dataset))]
        path = out / f"{name}-{method}.png"
        save_figure(rows, path, footer=tiles if method == "car" else None)
        files.append(path.name)
    return files


def _table(results: dict[str, dict[str, Any]]) -> list[str]:
    columns = [c for c in COLUMNS if any(c in r for r in results.values())]
    lines = ["| method | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for method, row in results.items():
        cells = [f"{row[c]:.3f}" if c in row else "" for c in columns]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return lines


def _per_kind(results: dict[str, Evaluation]) -> list[str]:
    kinds = sorted({k for r in results.values() for k in r.per_kind})
    if not kinds:
        return []
    first = next(r for r in results.values() if r.per_kind)
    lines = ["| event kind | true p | " + " | ".join(results) + " |", "|---|---|" + "---|" * len(results)]
    for kind in kinds:
        cells = [f"{r.per_kind[kind]['predicted']:.3f}" if kind in r.per_kind else "" for r in results.values()]
        lines.append(f"| {kind} | {first.per_kind[kind]['true']:.3f} | " + " | ".join(cells) + " |")
    return lines


def _toy_table(runs: dict[str, ToyResult]) -> list[str]:
    lines = [
        "| run | upper share | mean per-x error of the share | samples on a branch | max F error | seconds |",
        "|---|---|---|---|---|---|",
    ]
    for label, r in runs.items():
        lines.append(f"| {label} | {r.pi:.4f} | {r.local_error:.4f} | {r.on_branch:.3f} | {r.f_error:.4f} | {r.seconds:.0f} |")
    return lines


def _report(
    results: dict[str, Any], evaluations: dict[str, dict[str, Evaluation]], toy_runs: dict[str, ToyResult],
    figures: dict[str, list[str]], plan: Plan, seconds: float,
) -> str:
    toy = results["toy1d"]
    budgets = ", ".join(f"{d.name} {d.minutes:g} min per trained method, {d.cases} test cases" for d in plan.datasets)
    lines = [
        f"# carseg reproduce: the {plan.name} plan",
        "",
        f"Written by `carseg reproduce` ({plan.name}: {budgets}) in {seconds / 60:.1f} minutes. Every number below"
        " comes from `training.evaluate`, the code behind `carseg evaluate`, on held-out synthetic cases whose true label"
        " distribution is known; each trained method had the same training minutes.",
        "",
        "Methods: " + "; ".join(f"**{m}**: {DESCRIPTIONS[m]}" for m in METHODS) + ".",
        "",
        "Metrics: `ged_n` is GED with n samples against the 4 annotators, `ged_truth_16` against every mode of the true"
        " distribution; `ece` is over the pixels that can be in doubt; `calibration_error` pools each event kind,"
        " `event_calibration_error` compares event by event, next to `event_calibration_floor`, what a perfect"
        " sampler is expected to score with 16 samples; `coherence` is the share of an event's region that takes one label in a sample.",
        "",
        "## 1D toy regression (Kassapis et al., Fig. 3)",
        "",
        f"Share of G's samples on the upper branch: true {toy['pi_true']:.3f}, with L_cal **{toy['pi_car']:.3f}**,"
        f" without L_cal {toy['pi_no_cal']:.3f}.",
        "",
        *_toy_table(toy_runs),
        "",
        "![toy](toy1d.png)",
    ]
    for name, table in results["synthetic"].items():
        lines += ["", f"## synthetic:{name}", "", *_table(table), ""]
        lines += ["Per event kind, the share of samples in which the event happens:", "", *_per_kind(evaluations[name]), ""]
        lines += [f"![{name} {f}]({f})" for f in figures[name]]
    return "\n".join(lines) + "\n"


def reproduce(out: Path, plan: Plan, device: str = "cpu", lanes: int = 2) -> dict[str, Any]:
    """Run the whole pipeline of ``plan`` into ``out``; returns what ``results.json`` holds."""
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    versions, runs = _run_lanes(plan, out, device, lanes)
    toy = {"pi_true": PI_TRUE, **{f"pi_{label}": result.pi for label, (_, result) in runs.items()}}
    save_toy_figure({"with L_cal": runs["car"][0], "without L_cal": runs["no_cal"][0]}, out / "toy1d.png")
    synthetic: dict[str, dict[str, dict[str, Any]]] = {}
    evaluations: dict[str, dict[str, Evaluation]] = {}
    figures: dict[str, list[str]] = {}
    with tqdm(total=len(plan.datasets) * len(METHODS), unit="method", desc="evaluate") as bar:
        for data in plan.datasets:
            samplers = _samplers({m: versions[(data.name, m)] for m in TRAINED}, device)
            test = open_dataset(f"synthetic:{data.name}", "test", length=data.cases)
            evaluations[data.name] = {}
            for method in METHODS:
                evaluations[data.name][method] = evaluate(samplers[method], test, n_samples=16, n_large=plan.n_large)
                bar.update(1)
            synthetic[data.name] = {m: {**e.summary, "per_kind": e.per_kind} for m, e in evaluations[data.name].items()}
            figures[data.name] = _figures(data.name, samplers, evaluations[data.name], out)
    results = {"toy1d": toy, "synthetic": synthetic, "plan": plan.name}
    seconds = time.monotonic() - started
    toy_runs = {label: result for label, (_, result) in runs.items()}
    report = _report(results, evaluations, toy_runs, figures, plan, seconds)
    (out / "report.md").write_text(report)
    (out / "results.json").write_text(json.dumps({**results, "seconds": round(seconds, 1)}, indent=2, default=_json_default) + "\n")
    return results


def _json_default(value: object) -> object:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
