"""``carseg train``, ``carseg evaluate`` and ``carseg data synth``: the training side of the CLI.
Registering the commands imports no torch (``carseg serve --queue redis`` must not load it); each
command imports what it runs."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import TYPE_CHECKING

from training.config import TrainConfig
from training.data.folder import SPLITS

# the CLI's training defaults are TrainConfig's, so the two cannot drift apart
_TRAIN_DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrainConfig)}

if TYPE_CHECKING:
    import torch

    from training.evaluate import Evaluation


def _device(name: str, threads: int | None = None) -> torch.device:
    from training.sampling import use_device

    try:
        return use_device(name, threads)
    except ValueError as exc:
        raise SystemExit(f"--device: {exc}") from exc


def _train(args: argparse.Namespace) -> None:
    from training import distributed
    from training.train import train, use_amp

    device = _device(args.device, args.threads)
    if args.method == "ssn" and (args.init or args.amp or args.position or distributed.launched()):
        raise SystemExit("--init, --amp, --position and torchrun are for --method car: the SSN trains from scratch in one process, on no position")
    try:
        device = distributed.rank_device(device)
    except ValueError as exc:
        raise SystemExit(f"--device: {exc}") from exc
    try:
        use_amp(args.amp, device)
    except ValueError as exc:
        raise SystemExit(f"--amp: {exc}") from exc
    config = TrainConfig(
        data=args.data,
        out=Path(args.out),
        steps=args.steps,
        minutes=args.minutes,
        size=args.size,
        lambda_cal=args.lambda_cal,
        lambda_adv=args.lambda_adv,
        lr_f=args.lr_f,
        lr_g=args.lr_g,
        lr_d=args.lr_d,
        weight_decay=args.weight_decay,
        cal_forward_weight=args.cal_forward_weight,
        samples=args.samples,
        batch_size=args.batch_size,
        seed=args.seed,
        device=str(device),
        val_every_s=args.val_every,
        val_share=args.val_share,
        f_warmup=args.f_warmup,
        amp=args.amp,
        position=args.position,
        init=Path(args.init) if args.init else None,
    )
    if args.method == "ssn":
        from training.train_ssn import train_ssn

        version = train_ssn(config)
    else:
        version = train(config)
    if distributed.is_main():
        print(f"best version: {version}")  # noqa: T201 - CLI output


def _print_evaluation(title: str, result: Evaluation) -> None:
    rows = [(k, f"{v:.4f}" if isinstance(v, float) else str(v)) for k, v in result.summary.items()]
    width = max(len(k) for k, _ in rows)
    print(title)  # noqa: T201 - CLI output
    for key, value in rows:
        print(f"  {key:<{width}}  {value}")  # noqa: T201
    for kind, row in result.per_kind.items():
        print(f"  {kind:<{width}}  predicted {row['predicted']:.3f}  p_F {row['p_f']:.3f}  true {row['true']:.3f}  ({row['events']} events)")  # noqa: T201
    for name, diagram in result.reliability.items():
        print(f"  reliability of {name} (ambiguous pixels): bin, pixels, mean p, observed")  # noqa: T201
        bins = len(diagram.counts)
        for b, count in enumerate(diagram.counts):
            if count:
                edges = f"[{b / bins:.1f}, {(b + 1) / bins:.1f})"
                print(f"    {edges}  {count:>9}  {diagram.confidence[b]:.3f}  {diagram.frequency[b]:.3f}")  # noqa: T201


def _evaluate(args: argparse.Namespace) -> None:
    from training.baselines import baseline
    from training.checkpoint import load_model
    from training.data import open_dataset
    from training.evaluate import evaluate, sample_case
    from training.figure import FIGURE_OUTPUTS, case_row, reliability_tile, save_figure

    model = load_model(Path(args.checkpoint), _device(args.device))
    networks = model.networks if args.method == "model" else baseline(model.networks, args.method)
    if args.decision != "model":
        networks = dataclasses.replace(networks, decision_override=args.decision)
    dataset = open_dataset(args.data, args.split, length=args.cases)
    if list(dataset.classes) != model.classes:
        raise SystemExit(f"data classes {list(dataset.classes)} differ from the model's {model.classes}")
    large = args.samples_large if args.samples_large and args.samples_large > args.samples else None
    result = evaluate(networks, dataset, n_samples=args.samples, n_large=large)
    method = model.manifest.get("method", "car") if args.method == "model" else args.method
    _print_evaluation(f"{model.name} v{model.version} ({method}) on {args.data} [{args.split}]", result)
    report = {
        **result.to_json(), "method": method, "decision": networks.decision, "model": model.name, "version": model.version,
        "data": args.data, "split": args.split,
    }
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    if args.figure:
        picks = range(min(args.figure_cases, len(dataset)))
        rows = [case_row(dataset[i], sample_case(networks, dataset[i], args.samples, i, FIGURE_OUTPUTS)) for i in picks]
        footer = [reliability_tile(diagram, f"{method}: {name}") for name, diagram in result.reliability.items()]
        save_figure(rows, Path(args.figure), footer=footer)
    if args.record:
        manifest_path = model.path / "manifest.json"
        manifest = json.loads(manifest_path.read_text())
        key = f"{args.data}:{args.split}" if args.method == "model" else f"{args.data}:{args.split}:{args.method}"
        manifest.setdefault("metrics", {})[key] = report
        if args.split == "val" and args.method == "model":
            # the validation set's summaries are the band drift monitoring holds the served model to
            manifest["uncertainty_reference"] = result.uncertainty
        manifest_path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def _reproduce(args: argparse.Namespace) -> None:
    from training.reproduce import FULL_PLAN, QUICK_PLAN, reproduce

    device = _device(args.device, args.threads)
    out = Path(args.out)
    results = reproduce(out, QUICK_PLAN if args.quick else FULL_PLAN, device=str(device))
    toy = results["toy1d"]
    print(f"toy: pi_true {toy['pi_true']:.3f}  pi_car {toy['pi_car']:.3f}  pi_no_cal {toy['pi_no_cal']:.3f}")  # noqa: T201
    for name, table in results["synthetic"].items():
        for method, row in table.items():
            print(  # noqa: T201
                f"{name:<6} {method:<13} ged_16 {row['ged_16']:.3f}  calibration_error {row['calibration_error']:.3f}  "
                f"event_calibration_error {row['event_calibration_error']:.3f}  coherence {row['coherence']:.3f}"
            )
    print(f"report: {out / 'report.md'}")  # noqa: T201


def _synth(args: argparse.Namespace) -> None:
    from training.data import DatasetError, open_dataset
    from training.data.folder import write_case, write_classes

    out = Path(args.out)
    counts = {"train": args.train, "val": args.val, "test": args.test}
    try:
        first = open_dataset(f"synthetic:{args.generator}", "train", 1)
    except DatasetError as exc:
        raise SystemExit(str(exc)) from exc
    write_classes(out, first.classes)
    for split in SPLITS:
        dataset = open_dataset(f"synthetic:{args.generator}", split, counts[split])
        for index in range(len(dataset)):
            write_case(out / split, dataset[index])
    print(f"wrote {sum(counts.values())} cases to {out}")  # noqa: T201


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train F, G and D; writes MODEL_DIR/<version>/")
    p.add_argument(
        "--data", required=True,
        help="folder, lidc-sample, lidc-v2:PATH, lidc-v1:PICKLE, cityscapes:PATH or synthetic:{halo,flips,cells,cells_rare}; "
        "A+B trains on a mixture, each part drawn equally often, or by its share: A@3+B",
    )
    p.add_argument("--method", default="car", choices=("car", "ssn"), help="car, or the peer method SSN (Monteiro et al. 2020)")
    p.add_argument("--out", required=True, help="model folder (e.g. models/default)")
    budget = p.add_mutually_exclusive_group(required=True)
    budget.add_argument("--steps", type=int)
    budget.add_argument("--minutes", type=float)
    p.add_argument("--size", type=int, help="train on random square crops of this side")
    p.add_argument("--lambda-cal", type=float, default=_TRAIN_DEFAULTS["lambda_cal"], help="weight of L_cal (0 = the ablation)")
    p.add_argument("--lambda-adv", type=float, default=_TRAIN_DEFAULTS["lambda_adv"], help="weight of L_adv (0 = CAR without D: D is not run)")
    p.add_argument("--lr-f", type=float, default=_TRAIN_DEFAULTS["lr_f"], help="F's learning rate")
    p.add_argument("--lr-g", type=float, default=_TRAIN_DEFAULTS["lr_g"], help="G's learning rate")
    p.add_argument("--lr-d", type=float, default=_TRAIN_DEFAULTS["lr_d"], help="D's learning rate")
    p.add_argument("--weight-decay", type=float, default=_TRAIN_DEFAULTS["weight_decay"], help="F's and G's L2 weight decay (D has none)")
    p.add_argument("--cal-forward-weight", type=float, default=_TRAIN_DEFAULTS["cal_forward_weight"], help="weight of the forward KL inside L_cal")
    p.add_argument("--samples", type=int, default=_TRAIN_DEFAULTS["samples"], help="samples of G per input per step")
    p.add_argument("--batch-size", type=int, default=_TRAIN_DEFAULTS["batch_size"])
    p.add_argument("--seed", type=int, default=_TRAIN_DEFAULTS["seed"])
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--val-every", type=float, default=_TRAIN_DEFAULTS["val_every_s"], help="least seconds of training between validations")
    p.add_argument(
        "--val-share", type=float, default=_TRAIN_DEFAULTS["val_share"],
        help="validation's largest share of the run's time: a slow validation spaces the next ones out",
    )
    p.add_argument("--f-warmup", type=float, default=_TRAIN_DEFAULTS["f_warmup"], help="share of the budget F trains alone before G starts")
    p.add_argument(
        "--amp", action=argparse.BooleanOptionalAction, default=_TRAIN_DEFAULTS["amp"],
        help="bfloat16 autocast of the forward passes (default: on CUDA, off on a CPU, where it is refused: ~70x slower there)",
    )
    p.add_argument(
        "--position", action=argparse.BooleanOptionalAction, default=_TRAIN_DEFAULTS["position"],
        help="F also sees each pixel's place in the whole image: for images centred on what is to be segmented",
    )
    p.add_argument(
        "--init", metavar="MODEL_DIR",
        help="fine-tune: start F and G from this model (model folder: its latest version; or a version folder), with its architecture; "
        "if --out has a train-state, that resumes instead (the same --init is then ignored, another refused)",
    )
    p.set_defaults(func=_train)

    p = sub.add_parser("evaluate", help="metrics of a checkpoint on a data set")
    p.add_argument("--checkpoint", required=True, help="version folder or model folder (latest version)")
    p.add_argument("--data", required=True)
    p.add_argument("--split", default="test", choices=SPLITS)
    p.add_argument("--samples", type=int, default=16, help="n of GED_n, HM-IoU_n and the calibration metrics")
    p.add_argument("--samples-large", type=int, default=100, help="also GED at this n (the literature's GED_100); 0 = skip")
    p.add_argument(
        "--method", default="model", choices=("model", "independent", "deterministic"),
        help="the checkpoint's own sampler, or a baseline built on its F (training.baselines)",
    )
    p.add_argument(
        # training.sampling.DECISIONS, spelled out: registering the commands imports no torch
        "--decision", default="model", choices=("model", "argmax", "rounding"),
        help="how soft samples become label maps: the model's own (G's config), argmax or rounding (training.sampling)",
    )
    p.add_argument("--cases", type=int, help="synthetic: how many cases (default 200 for test)")
    p.add_argument("--json")
    p.add_argument("--figure", help="PNG: cases, samples, uncertainty maps and the reliability diagram")
    p.add_argument("--figure-cases", type=int, default=4)
    p.add_argument("--record", action="store_true", help="store the result in the model's manifest")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, help="CPU threads for torch/OpenMP (default: the cores this process may use; see README, CPU threads)")
    p.set_defaults(func=_evaluate)

    p = sub.add_parser("reproduce", help="train and evaluate CAR and its baselines on synthetic data and the 1D toy; writes a report")
    p.add_argument("--out", required=True, help="folder for report.md, results.json, figures and models")
    p.add_argument("--quick", action="store_true", help="under 10 CPU minutes instead of 2 CPU hours")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, help="CPU threads for torch/OpenMP")
    p.set_defaults(func=_reproduce)

    p = sub.add_parser("data", help="data utilities")
    data_sub = p.add_subparsers(dest="data_command", required=True)
    s = data_sub.add_parser("synth", help="write a synthetic data set in the folder format")
    s.add_argument("generator", help="a synthetic generator, as in --data synthetic:NAME")
    s.add_argument("out")
    s.add_argument("--train", type=int, default=1000)
    s.add_argument("--val", type=int, default=48)
    s.add_argument("--test", type=int, default=200)
    s.set_defaults(func=_synth)
