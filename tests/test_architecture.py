"""The import contract (DESIGN.md), checked on the import graph and, for the promise that matters
at run time, in a real process: an API started with ``--queue redis`` never loads torch."""

import json
import subprocess
import sys

import grimp
import pytest

from tests.embedded import free_port
from tests.queue_backends import REPO, worker_process
from tests.service_fixtures import b64, grey, png, write_tiny_model

# the only doors from the service into the method: networks, their checkpoints (manifest: the
# torch-free half), the sampler and the names and band of its uncertainty summaries (torch-free)
SERVICE_MAY_IMPORT = {"training.networks", "training.checkpoint", "training.manifest", "training.sampling", "training.uncertainty_summary"}
# what an API replica in Redis mode runs: the HTTP layer, the transports, the job contract
TORCH_FREE = ("service.api", "service.queue", "service.jobs", "service.registry", "service.segmentation", "service.codecs")


@pytest.fixture(scope="module")
def graph():
    return grimp.build_graph("carseg", "service", "training", include_external_packages=True)


def modules_of(graph, package):
    return {package} | graph.find_descendants(package) if package in graph.modules else set()


def test_training_never_imports_service_or_the_command(graph):
    for importer in modules_of(graph, "training"):
        for imported in graph.find_modules_directly_imported_by(importer):
            assert not imported.startswith(("service", "carseg")), f"{importer} imports {imported}"


def test_service_reaches_training_only_through_its_doors(graph):
    crossings = set()
    for importer in modules_of(graph, "service"):
        for imported in graph.find_modules_directly_imported_by(importer):
            if imported.split(".")[0] == "training":
                crossings.add((importer, imported))
                assert imported in SERVICE_MAY_IMPORT, f"{importer} imports {imported}"
    assert ("service.runner.executor", "training.sampling") in crossings  # the contract sees real imports


@pytest.mark.parametrize("package", TORCH_FREE)
def test_the_api_side_never_imports_torch(graph, package):
    for module in modules_of(graph, package):
        chain = graph.find_shortest_chain(importer=module, imported="torch")
        assert chain is None, " -> ".join(chain)


def test_the_runner_does_import_torch(graph):
    # the check above would pass on a graph without external packages: make sure it can see torch
    assert graph.find_shortest_chain(importer="service.runner.executor", imported="torch") is not None


# Runs `carseg serve --queue redis` through the command's own entry point inside this child
# process, waits for readiness, posts one image, and reports which heavy packages it loaded.
API_PROBE = """
import json, sys, threading, time, urllib.request
from carseg.cli import main
url, port, model_dir, body = sys.argv[1:5]
args = ["serve", "--queue", "redis", "--redis-url", url, "--port", port, "--model-dir", model_dir]
threading.Thread(target=main, args=(args,), daemon=True).start()
base = f"http://127.0.0.1:{port}"
deadline = time.monotonic() + 60
while True:
    try:
        if urllib.request.urlopen(base + "/health/ready", timeout=2).status == 200:
            break
    except OSError:
        assert time.monotonic() < deadline, "API never ready"
        time.sleep(0.05)  # polling interval
request = urllib.request.Request(base + "/v1/models/tiny/samples", data=body.encode(), headers={"content-type": "application/json"})
reply = json.load(urllib.request.urlopen(request, timeout=60))
heavy = sorted({m.split(".")[0] for m in sys.modules} & {"torch", "safetensors", "scipy"})
print(json.dumps({"masks": len(reply["masks"]), "heavy": heavy}))
"""


def test_an_api_in_redis_mode_never_loads_torch(tmp_path, redis_url):
    write_tiny_model(tmp_path / "models", "tiny")
    worker = worker_process(tmp_path / "models", redis_url, tmp_path / "worker.log")
    try:
        body = json.dumps({"image": b64(png(grey(24, 24))), "k": 3, "seed": 1})
        probe = subprocess.run(
            [sys.executable, "-c", API_PROBE, redis_url, str(free_port()), str(tmp_path / "models"), body],
            cwd=REPO, capture_output=True, text=True, timeout=120,
        )
    finally:
        worker.terminate()
        worker.wait(10)
    assert probe.returncode == 0, probe.stderr[-3000:] + (tmp_path / "worker.log").read_text()[-2000:]
    report = json.loads(probe.stdout.strip().splitlines()[-1])
    assert report == {"masks": 3, "heavy": []}, report
