"""CPU threads and the OpenMP wait policy: derived from the cores a process may use (affinity and the
cgroup CPU quota) and set by ``carseg``'s entry point before torch loads (carseg/threads.py)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from carseg import threads

REPO = Path(__file__).resolve().parents[1]

OMP_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY")


@pytest.fixture
def affinity(monkeypatch):
    """Pretend this process may run on ``n`` cores."""

    def set_cores(n: int) -> None:
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(n)), raising=False)

    set_cores(8)
    return set_cores


@pytest.fixture
def clean_env(monkeypatch):
    """No OMP_*/MKL_* variables, and this test process's torch thread count restored afterwards
    (torch is loaded here, so ``configure`` also calls ``torch.set_num_threads``)."""
    for var in OMP_VARS:
        monkeypatch.delenv(var, raising=False)
    before = torch.get_num_threads()
    yield monkeypatch
    torch.set_num_threads(before)


def cgroup(tmp_path, files: dict[str, str]):
    for name, text in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")
    return tmp_path


def cores(root, proc_cgroup="/nonexistent/cgroup"):
    return threads.available_cores(cgroup_root=root, proc_cgroup=proc_cgroup)


def test_no_cgroup_files_means_the_affinity(tmp_path, affinity):
    assert cores(tmp_path) == 8
    affinity(3)
    assert cores(tmp_path) == 3


def test_cgroup_v2_quota_rounds_up_and_is_bounded_by_the_affinity(tmp_path, affinity):
    root = cgroup(tmp_path, {"cpu.max": "150000 100000"})
    assert cores(root) == 2  # 1.5 cores -> 2
    affinity(1)
    assert cores(root) == 1  # the affinity is tighter


def test_cgroup_v2_without_a_quota_means_the_affinity(tmp_path, affinity):
    assert cores(cgroup(tmp_path, {"cpu.max": "max 100000"})) == 8


def test_cgroup_v2_a_small_quota_still_gives_one_core(tmp_path, affinity):
    assert cores(cgroup(tmp_path, {"cpu.max": "10000 100000"})) == 1


def test_cgroup_v1_quota(tmp_path, affinity):
    assert cores(cgroup(tmp_path, {"cpu/cpu.cfs_quota_us": "300000", "cpu/cpu.cfs_period_us": "100000"})) == 3
    assert cores(cgroup(tmp_path / "flat", {"cpu.cfs_quota_us": "250000", "cpu.cfs_period_us": "100000"})) == 3
    assert cores(cgroup(tmp_path / "none", {"cpu/cpu.cfs_quota_us": "-1", "cpu/cpu.cfs_period_us": "100000"})) == 8


def test_the_tightest_quota_on_the_process_cgroup_path_counts(tmp_path, affinity):
    # a host process in a systemd slice: its cgroup is nested, the quota sits on an ancestor
    root = cgroup(tmp_path / "fs", {"app.slice/cpu.max": "200000 100000", "app.slice/svc.service/cpu.max": "max 100000"})
    proc = cgroup(tmp_path, {"proc": "0::/app.slice/svc.service"}) / "proc"
    assert cores(root, proc) == 2
    assert cores(root) == 8  # without the process's path only the root is read, and it has no quota


def test_configure_sets_the_cores_and_passive_where_unset(clean_env, monkeypatch):
    monkeypatch.setattr(threads, "available_cores", lambda: 3)
    result = threads.configure(None)
    assert result == {"OMP_NUM_THREADS": "3", "MKL_NUM_THREADS": "3", "OMP_WAIT_POLICY": "PASSIVE"}
    assert {v: os.environ[v] for v in OMP_VARS} == result
    assert torch.get_num_threads() == 3  # torch is already loaded here: the count still applies


def test_configure_keeps_what_the_user_set(clean_env, caplog):
    clean_env.setenv("OMP_NUM_THREADS", "1")
    clean_env.setenv("MKL_NUM_THREADS", "1")
    clean_env.setenv("OMP_WAIT_POLICY", "ACTIVE")
    assert threads.configure(None) == {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OMP_WAIT_POLICY": "ACTIVE"}
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"
    assert "child processes only" not in caplog.text  # the user's policy was in force from the start


def test_configure_gives_both_counts_the_one_the_user_set(clean_env):
    # torch sets OpenMP's count from MKL's when it loads: a lone OMP_NUM_THREADS must reach MKL's too
    clean_env.setenv("OMP_NUM_THREADS", "1")
    assert threads.configure(None)["MKL_NUM_THREADS"] == "1"


def test_configure_threads_argument_wins_over_the_environment(clean_env):
    clean_env.setenv("OMP_NUM_THREADS", "4")
    result = threads.configure(1)
    assert result["OMP_NUM_THREADS"] == result["MKL_NUM_THREADS"] == "1" and result["OMP_WAIT_POLICY"] == "PASSIVE"
    assert torch.get_num_threads() == 1


def test_configure_after_torch_loaded_warns_about_the_wait_policy(clean_env, caplog):
    threads.configure(1)
    assert "child processes only" in caplog.text


def test_configure_refuses_zero_threads(clean_env):
    with pytest.raises(ValueError, match="at least 1"):
        threads.configure(0)


# Runs the command's own entry point in a fresh process with the command's function replaced by a
# probe: the probe checks torch was not loaded yet, then loads it and reports what OpenMP got.
PROBE = """
import json, os, sys
import service.cli, training.cli
from carseg.threads import available_cores

def probe(args):
    loaded_before = "torch" in sys.modules
    import torch
    print(json.dumps({"loaded_before": loaded_before, "threads": torch.get_num_threads(), "cores": available_cores(),
                      **{v: os.environ.get(v) for v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY")}}))

for module, name in ((service.cli, "_serve"), (service.cli, "_worker"), (training.cli, "_train"), (training.cli, "_evaluate"), (training.cli, "_synth")):
    setattr(module, name, probe)
from carseg.cli import main
main(sys.argv[1:])
"""

COMMANDS = {
    "serve": ["serve"],
    "worker": ["worker"],
    "train": ["train", "--data", "synthetic:halo", "--out", "unused", "--steps", "1"],
    "evaluate": ["evaluate", "--checkpoint", "unused", "--data", "synthetic:halo"],
    "data synth": ["data", "synth", "halo", "unused"],
}


def run_probe(args: list[str], **env: str) -> dict:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "MKL_", "GOMP_", "KMP_"))}
    proc = subprocess.run([sys.executable, "-c", PROBE, *args], cwd=REPO, env={**base, "PYTHONPATH": str(REPO), **env},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("command", ["serve", "worker", "train", "evaluate"])
def test_the_entry_point_sets_threads_before_torch_loads(command):
    report = run_probe([*COMMANDS[command], "--threads", "1"])
    assert report["loaded_before"] is False  # nothing before the command imported torch
    assert report["threads"] == 1
    assert report["OMP_NUM_THREADS"] == report["MKL_NUM_THREADS"] == "1"
    assert report["OMP_WAIT_POLICY"] == "PASSIVE"


def test_a_command_without_threads_gets_the_available_cores():
    report = run_probe(COMMANDS["data synth"])
    assert report["loaded_before"] is False
    assert report["threads"] == report["cores"] and report["OMP_NUM_THREADS"] == str(report["cores"])
    assert report["OMP_WAIT_POLICY"] == "PASSIVE"


def test_the_user_environment_reaches_torch():
    report = run_probe(COMMANDS["worker"], OMP_NUM_THREADS="1", OMP_WAIT_POLICY="ACTIVE")
    assert report["threads"] == 1 and report["MKL_NUM_THREADS"] == "1" and report["OMP_WAIT_POLICY"] == "ACTIVE"


def test_registering_the_commands_imports_no_torch():
    code = "import sys; from carseg.cli import build_parser; build_parser(); print('torch' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=60, check=True)
    assert proc.stdout.strip() == "False"
