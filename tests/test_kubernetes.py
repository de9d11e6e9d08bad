"""The Kubernetes manifests (deploy/kubernetes), checked offline: both overlays build with kubectl's
kustomize; every object validates strictly against Kubernetes' own schemas (kubernetes-validate,
shipped as files in the package) and KEDA's objects against deploy/kubernetes/schemas; and the
manifests agree with the service they deploy: settings names, probe paths, command lines, the stream
and consumer group KEDA reads, selectors and ports. Against a real Redis: the lag KEDA scales on is
readable and counts the jobs no worker has taken yet. (A worker's drain on SIGTERM is in
test_faults.py, with the other worker-process faults.)"""

from __future__ import annotations

import asyncio
import copy
import json
import subprocess
import threading
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import redis
import torch
import yaml

from carseg.cli import build_parser
from service.api.routes import health
from service.config import Settings
from service.metrics import Metrics
from service.queue.redis_protocol import GROUP, Keys
from service.queue.redis_queue import RedisQueue
from service.registry import ModelRegistry
from service.worker import Worker
from tests.conftest import require_binary
from tests.queue_backends import fake_heartbeat, make_job

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "deploy" / "kubernetes"
OVERLAYS = ("cpu", "gpu")
KUBERNETES_VERSION = "1.30.0"  # the oldest minor still supported upstream when these were written
KEDA_SCHEMA = json.loads((K8S / "schemas" / "keda.sh-v1alpha1.json").read_text())
KUBECTL_PACKAGE = "kubectl (from Kubernetes' repository, pkgs.k8s.io; Debian's kubernetes-client 1.20 cannot build a kustomize base)"


def render(overlay: str) -> list[dict]:
    kubectl = require_binary("kubectl", KUBECTL_PACKAGE)
    built = subprocess.run([kubectl, "kustomize", str(K8S / "overlays" / overlay)], capture_output=True, text=True, timeout=60)
    assert built.returncode == 0, built.stderr
    return [doc for doc in yaml.safe_load_all(built.stdout) if doc]


def validate(doc: dict) -> None:
    """Kubernetes' schema for a built-in kind (unknown fields refused), ours for KEDA's kinds."""
    if doc["apiVersion"].startswith("keda.sh/"):
        jsonschema.validate(doc, {**KEDA_SCHEMA, "$ref": f"#/$defs/{doc['kind']}"})
    else:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def by_kind(docs: list[dict], kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def containers(docs: list[dict]) -> list[tuple[dict, dict]]:
    """(pod template spec, container) of every workload."""
    return [(d["spec"]["template"]["spec"], c) for d in docs if d["kind"] in ("Deployment", "StatefulSet")
            for c in d["spec"]["template"]["spec"]["containers"]]


@pytest.fixture(scope="module", params=OVERLAYS)
def overlay(request) -> tuple[str, list[dict]]:
    return request.param, render(request.param)


def test_every_object_validates_strictly(overlay):
    _, docs = overlay
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == sorted(["Namespace", "ConfigMap", "Service", "Service", "StatefulSet", "Deployment", "Deployment",
                            "PodDisruptionBudget", "PodDisruptionBudget", "TriggerAuthentication", "ScaledObject"]), kinds
    for doc in docs:
        validate(doc)
    assert all(d["metadata"].get("namespace") == "carseg" for d in docs if d["kind"] != "Namespace")


def test_the_validation_can_fail(overlay):
    """A misspelt field in a Deployment, and a number where KEDA wants a string, are refused."""
    _, docs = overlay
    worker = copy.deepcopy(by_kind(docs, "Deployment")["worker"])
    worker["spec"]["template"]["spec"]["terminationGracePeriod"] = 90
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(worker)
    scaled = copy.deepcopy(by_kind(docs, "ScaledObject")["worker"])
    scaled["spec"]["triggers"][0]["metadata"]["lagCount"] = 8
    with pytest.raises(jsonschema.ValidationError):
        validate(scaled)


def test_manifests_agree_with_the_service(overlay):
    _, docs = overlay
    settings_fields = {f"CARSEG_{name.upper()}" for name in Settings.model_fields}
    config = by_kind(docs, "ConfigMap")["carseg-settings"]["data"]
    assert set(config) <= settings_fields, set(config) - settings_fields
    for name, value in config.items():  # each value parses as the setting it sets
        Settings.model_validate({name.removeprefix("CARSEG_").lower(): value})

    parser = build_parser()
    probe_paths = {route.path for route in health.router.routes}
    for pod, container in containers(docs):
        env = {e["name"] for e in container.get("env", [])}
        assert {n for n in env if n.startswith("CARSEG_")} <= settings_fields
        for ref in [e["valueFrom"]["secretKeyRef"] for e in container.get("env", []) if "valueFrom" in e]:
            # the one secret, with the keys the kustomization's comment tells the operator to create
            assert ref["name"] == "carseg-secrets" and f"--from-literal={ref['key']}=" in (K8S / "base" / "kustomization.yaml").read_text()
        ports = {p["name"] for p in container.get("ports", [])}
        for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
            spec = container.get(probe, {})
            if "httpGet" in spec:
                assert spec["httpGet"]["port"] in ports
                if spec["httpGet"]["port"] == "http":
                    assert spec["httpGet"]["path"] in probe_paths
        if container["image"].startswith("carseg:"):
            command = container["command"] + container.get("args", [])
            assert command[0] == "carseg"
            parser.parse_args(command[1:])  # exits (fails the test) on an unknown flag
            # a pod's grace outlasts the longest request it may hold
            assert pod["terminationGracePeriodSeconds"] > Settings().request_timeout_s

    pods = {n: d["spec"]["template"]["metadata"]["labels"] for n, d in {**by_kind(docs, "Deployment"), **by_kind(docs, "StatefulSet")}.items()}
    for service in by_kind(docs, "Service").values():
        assert any(service["spec"]["selector"].items() <= labels.items() for labels in pods.values()), service["metadata"]["name"]
    for budget in by_kind(docs, "PodDisruptionBudget").values():
        assert sum(budget["spec"]["selector"]["matchLabels"].items() <= labels.items() for labels in pods.values()) == 1


def test_keda_scales_the_workers_on_every_models_stream(overlay):
    _, docs = overlay
    scaled = by_kind(docs, "ScaledObject")["worker"]
    assert scaled["spec"]["scaleTargetRef"]["name"] in by_kind(docs, "Deployment")
    # the API is ready, and admits a request, only while a live worker serves the model: with no
    # worker nothing would ever queue, so the lag could never call the first one
    assert scaled["spec"]["minReplicaCount"] >= 1
    keys = Keys(by_kind(docs, "ConfigMap")["carseg-settings"]["data"]["CARSEG_REDIS_PREFIX"])
    triggers = scaled["spec"]["triggers"]
    assert {t["metadata"]["stream"] for t in triggers} == {keys.stream(m) for m in ModelRegistry(REPO / "models").names()}
    redis_service = by_kind(docs, "Service")["redis"]
    for trigger in triggers:
        assert trigger["type"] == "redis-streams" and trigger["metadata"]["consumerGroup"] == GROUP
        assert "lagCount" in trigger["metadata"]  # lag: waiting and undelivered, not pending (already taken)
        host, port = trigger["metadata"]["address"].rsplit(":", 1)
        assert host.split(".")[:2] == [redis_service["metadata"]["name"], redis_service["metadata"]["namespace"]]
        assert int(port) == redis_service["spec"]["ports"][0]["port"]
        assert trigger["authenticationRef"]["name"] in by_kind(docs, "TriggerAuthentication")


def test_overlays_differ_in_the_workers_device_only(overlay):
    name, docs = overlay
    worker = by_kind(docs, "Deployment")["worker"]["spec"]["template"]["spec"]["containers"][0]
    limits = worker["resources"]["limits"]
    if name == "gpu":
        assert worker["image"] == "carseg:cuda" and worker["args"] == ["--device", "cuda"]
        assert limits["nvidia.com/gpu"] == 1 == worker["resources"]["requests"]["nvidia.com/gpu"]
        assert {"name": "CARSEG_BATCH_MAX_SAMPLES", "value": "256"} in worker["env"]
    else:
        assert worker["image"] == "carseg:cpu" and worker["args"] == ["--device", "cpu"]
        assert "nvidia.com/gpu" not in limits
    api = by_kind(docs, "Deployment")["api"]["spec"]["template"]["spec"]["containers"][0]
    assert api["image"] == "carseg:cpu"  # the API never needs the CUDA image


def test_the_lag_keda_reads_counts_jobs_no_worker_has_taken(model_dir, redis_url):
    """XINFO GROUPS' lag (Redis 7) stays readable while answered jobs are deleted from the stream
    (Redis cannot count past a deleted entry that no consumer has read): N jobs queued with no
    worker reading give lag N; once a worker has answered them, lag 0, not null."""
    settings = Settings(model_dir=model_dir, queue="redis", redis_url=redis_url, heartbeat_interval_s=0.2, heartbeat_ttl_s=1.0,
                        visibility_timeout_s=2.0, worker_block_ms=50, device="cpu")
    client, stream = redis.Redis.from_url(redis_url), Keys(settings.redis_prefix).stream("tiny")
    registry = ModelRegistry(model_dir)

    def lag() -> int | None:
        return {g["name"].decode(): g for g in client.xinfo_groups(stream)}[GROUP]["lag"]

    def serve_once() -> None:
        worker = Worker(settings, registry, torch.device("cpu"), models=["tiny"], name="lag-test")
        worker.run(burst=True)

    serve_once()  # the group exists from a worker's first start (KEDA keeps one running)
    assert lag() == 0

    async def run() -> None:
        queue = RedisQueue(settings, Metrics(), ["tiny"])
        await queue.start()
        fake_heartbeat(redis_url, settings)
        try:
            jobs = [asyncio.create_task(queue.submit(make_job(seed=i, timeout_s=60))) for i in range(6)]
            while client.xlen(stream) < 6:
                await asyncio.sleep(0.01)  # polling for the submissions
            assert lag() == 6
            thread = threading.Thread(target=serve_once)
            thread.start()
            results = await asyncio.gather(*jobs)
            await asyncio.to_thread(thread.join, 30)
            assert len(results) == 6
        finally:
            await queue.stop()

    asyncio.run(run())
    assert client.xlen(stream) == 0  # answered jobs are deleted
    assert lag() == 0
