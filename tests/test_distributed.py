"""Data-parallel training on two CPU processes over gloo: the helpers of ``training.distributed``
on two ranks, and ``train`` launched by torchrun as users launch it."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors import safe_open

from tests.test_train import TINY
from training import distributed, losses
from training.config import TrainConfig
from training.networks import Discriminator, DiscriminatorConfig, soft_one_hot
from training.train import STATE_DIR, train

TORCHRUN = Path(sys.executable).with_name("torchrun")

# Each rank runs ``train`` and, whenever rank 0 saves, writes a hash of the weights it holds itself:
# the test compares the ranks' files, independently of the check ``train`` makes on its own.
WORKER = r"""
import hashlib, json, os, sys
from pathlib import Path

import training.train as t
from training.config import TrainConfig

kwargs, hashes = json.loads(sys.argv[1]), Path(sys.argv[2])
checkpoint = t._checkpoint

def recording(run, log, validate):
    digests = {
        name: hashlib.sha256(b"".join(k.encode() + v.detach().cpu().contiguous().numpy().tobytes() for k, v in module.state_dict().items())).hexdigest()
        for name, module in run.nets.in_sync().items()
    }
    (hashes / f"step{run.progress.step}-rank{os.environ['RANK']}.json").write_text(json.dumps(digests))
    checkpoint(run, log, validate)

t._checkpoint = recording
t.train(TrainConfig(**{**kwargs, "out": Path(kwargs["out"])}))
"""


def _kwargs(out: Path, steps: int) -> dict:
    return {
        "data": "synthetic:flips", "out": str(out), "steps": steps, "size": 32, "batch_size": 2, "samples": 2,
        "f_warmup": 0.25, "val_every_s": 1e9, "val_cases": 2, "val_samples": 3, "architecture": TINY,
    }


def _torchrun(kwargs: dict, hashes: Path) -> None:
    hashes.mkdir(exist_ok=True)
    command = [str(TORCHRUN), "--standalone", "--nproc_per_node", "2", "--no-python", sys.executable, "-c", WORKER, json.dumps(kwargs), str(hashes)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=180, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]


def _layout(version: Path) -> dict:
    """A version folder's files, its manifest's keys (two levels) and each tensor's name and shape."""
    manifest = json.loads((version / "manifest.json").read_text())
    tensors = {}
    for path in sorted(version.glob("*.safetensors")):
        with safe_open(str(path), "pt") as fh:
            tensors[path.name] = {key: tuple(fh.get_slice(key).get_shape()) for key in fh.keys()}
    keys = {key: sorted(value) if isinstance(value, dict) and key != "metrics" else None for key, value in manifest.items()}
    return {"files": sorted(p.name for p in version.iterdir()), "manifest": keys, "tensors": tensors}


def test_two_ranks_under_torchrun_stay_identical_resume_and_save_the_single_process_format(tmp_path):
    ddp, single, hashes = tmp_path / "ddp", tmp_path / "single", tmp_path / "hashes"
    _torchrun(_kwargs(ddp, 4), hashes)
    _torchrun(_kwargs(ddp, 6), hashes)  # resumes from the train-state the first run saved

    saved = sorted(p.name for p in hashes.iterdir())
    assert saved == ["step4-rank0.json", "step4-rank1.json", "step6-rank0.json", "step6-rank1.json"]
    for step in (4, 6):
        rank0, rank1 = (json.loads((hashes / f"step{step}-rank{r}.json").read_text()) for r in (0, 1))
        assert set(rank0) == {"calibration", "refinement", "discriminator", "ema_f", "ema_g"}
        assert rank0 == rank1, f"step {step}: the ranks' weights differ"
    assert json.loads((hashes / "step4-rank0.json").read_text()) != json.loads((hashes / "step6-rank0.json").read_text())

    state = json.loads((ddp / STATE_DIR / "state.json").read_text())
    assert state["step"] == 6 and state["version"] == "1"
    history = [json.loads(line)["step"] for line in (ddp / STATE_DIR / "history.jsonl").read_text().splitlines()]
    assert history == [4, 6]  # rank 0 alone validates and writes

    train(TrainConfig(**{**_kwargs(single, 4), "out": single}))
    assert _layout(ddp / "1") == _layout(single / "1")
    world = [json.loads((out / "1" / "manifest.json").read_text())["training"]["world_size"] for out in (ddp, single)]
    assert world == [2, 1]


def _data(rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(10 + rank)
    image = torch.randn(2, 3, 16, 16, generator=generator)
    real = soft_one_hot(torch.randint(4, (2, 16, 16), generator=generator), 4)
    fake = torch.rand(2, 4, 16, 16, generator=generator).softmax(1)
    return image, real, fake


def _two_ranks(rank: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2")
    with distributed.process_group(torch.device("cpu")):
        _helpers_on(rank)
    # Leave without the interpreter's teardown: there gloo's native threads outlived the group now
    # and then and aborted the process (``terminate called without an active exception``, about 1
    # run in 30 on a loaded machine, after every assertion had passed). A failure above still
    # raises, and mp.spawn reports it.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _helpers_on(rank: int) -> None:
    assert distributed.world_size() == 2 and distributed.is_main() == (rank == 0)
    # rank 0's clock decides for both
    shared = distributed.decide(0.25, 1.0) if rank == 0 else distributed.decide(0.9, 0.0)
    assert shared == [0.25, 1.0]
    assert distributed.mean(torch.tensor(float(rank))).item() == 0.5

    norm = torch.nn.BatchNorm2d(3)
    norm.running_mean.fill_(float(rank))
    distributed.average_buffers(norm)
    assert torch.equal(norm.running_mean, torch.full((3,), 0.5))

    # D's loss has R1's double backward: DDP must still average D's gradients exactly
    torch.manual_seed(0)
    disc = Discriminator(DiscriminatorConfig(3, 4, (8, 8)))
    local = Discriminator(DiscriminatorConfig(3, 4, (8, 8)))
    local.load_state_dict(disc.state_dict())
    wrapped = distributed.wrap(disc, torch.device("cpu"))
    loss, _ = losses.discriminator_loss(wrapped, *_data(rank), r1_gamma=0.625)
    loss.backward()
    own = []
    for r in (0, 1):
        local.zero_grad()
        losses.discriminator_loss(local, *_data(r), r1_gamma=0.625)[0].backward()
        own.append([p.grad.clone() for p in local.parameters()])
    for averaged, g0, g1 in zip(disc.parameters(), *own, strict=True):
        torch.testing.assert_close(averaged.grad, (g0 + g1) / 2)

    distributed.check_in_sync({"discriminator": disc})
    if rank == 1:
        with torch.no_grad():
            next(disc.parameters())[0].add_(1e-3)
    with pytest.raises(distributed.RanksDivergedError, match="discriminator"):
        distributed.check_in_sync({"norm": norm, "discriminator": disc})


def test_helpers_on_two_ranks_share_rank_0s_decisions_and_average_what_ddp_does_not(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)  # each child sets its own
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_two_ranks, args=(port,), nprocs=2, join=True)


def test_without_torchrun_the_helpers_are_the_single_process_identity(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    module = torch.nn.BatchNorm2d(2)
    value = torch.tensor(0.3)
    with distributed.process_group(torch.device("cpu")):
        assert not distributed.active() and distributed.rank() == 0 and distributed.world_size() == 1 and distributed.is_main()
        assert distributed.decide(0.4, 1.0) == [0.4, 1.0]
        assert distributed.mean(value) is value
        assert distributed.wrap(module, torch.device("cpu")) is module
        distributed.check_in_sync({"norm": module})
    assert distributed.rank_device(torch.device("cuda")) == torch.device("cuda")


def test_under_torchrun_each_rank_takes_its_own_gpu(monkeypatch):
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert distributed.rank_device(torch.device("cuda")) == torch.device("cuda", 1)
    assert distributed.rank_device(torch.device("cpu")) == torch.device("cpu")
    with pytest.raises(ValueError, match="LOCAL_RANK"):
        distributed.rank_device(torch.device("cuda", 0))
    assert distributed.rank() == 3 and not distributed.is_main()
