from __future__ import annotations

import os
import shutil

import pytest
import torch

# Two cores here and in CI: more threads than that only adds contention between tests.
torch.set_num_threads(min(2, os.cpu_count() or 1))


def require_binary(name: str, package: str) -> str:
    """The path of a program that is not a Python package. Where it is missing, CI fails (``.ci/run``
    installs it and sets CI=true); elsewhere the test is skipped with the command that installs it."""
    path = shutil.which(name)
    if path is None:
        message = f"{name} is not installed: apt-get install {package}"
        if os.environ.get("CI"):
            pytest.fail(f"{message} (.ci/run installs it; under CI a missing program is a failure, not a skip)")
        pytest.skip(message)
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A folder with one small random-weight model, ``tiny`` (1 channel, 2 classes)."""
    from tests.service_fixtures import write_tiny_model

    root = tmp_path_factory.mktemp("models")
    write_tiny_model(root, "tiny")
    return root


@pytest.fixture(scope="session")
def lidc_root():
    from training.data.lidc_sample import default_root

    root = default_root()
    if not root.is_dir():
        pytest.fail(f"the LIDC sample is missing at {root}; the repository ships it in data/lidc-sample")
    return root


class RedisProcess:
    """A real redis-server on a free loopback port, owned by the test session."""

    def __init__(self, aof_dir: str | None = None) -> None:
        """``aof_dir``: keep an append-only file there (fsync every second), as compose runs Redis,
        so that a restart keeps the streams; else nothing is kept."""
        from tests.embedded import free_port

        self.binary = require_binary("redis-server", "redis-server")
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.aof_dir = aof_dir
        self.proc = None

    def start(self) -> RedisProcess:
        import subprocess
        import time

        import redis

        persistence = ["--appendonly", "yes", "--appendfsync", "everysec", "--dir", self.aof_dir] if self.aof_dir else ["--appendonly", "no"]
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", *persistence],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        client = redis.Redis(port=self.port)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                if client.ping():
                    return self
            except redis.ConnectionError:  # also while it loads its append-only file (BusyLoadingError)
                time.sleep(0.02)  # polling interval
        raise TimeoutError("redis-server did not answer PING within 10 s")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
            self.proc = None

    def flush(self) -> None:
        import redis

        redis.Redis(port=self.port).flushall()


@pytest.fixture(scope="session")
def redis_process():
    server = RedisProcess().start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_process):
    redis_process.flush()
    return redis_process.url


class OrthancProcess:
    """A real PACS: Debian's Orthanc with its DICOMweb plugin, on a free loopback port, storing in a
    temporary folder; what OHIF shows and what carseg fetches a series from by its UID."""

    PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"

    def __init__(self, folder) -> None:
        from tests.embedded import free_port

        self.binary = require_binary("Orthanc", "orthanc orthanc-dicomweb")
        if not os.path.exists(self.PLUGIN):
            require_binary("orthanc-dicomweb-plugin-missing", "orthanc-dicomweb")
        self.folder, self.port = folder, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = None

    def start(self) -> OrthancProcess:
        import json
        import subprocess
        import time

        import httpx

        config = {
            "Name": "carseg-test", "HttpPort": self.port, "DicomServerEnabled": False, "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False, "StorageDirectory": str(self.folder / "storage"), "IndexDirectory": str(self.folder / "index"),
            "Plugins": [self.PLUGIN], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        }
        path = self.folder / "orthanc.json"
        path.write_text(json.dumps(config))
        self.proc = subprocess.Popen([self.binary, str(path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/system", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                time.sleep(0.1)  # polling interval while Orthanc opens its index
        self.stop()
        raise TimeoutError("Orthanc did not answer within 30 s")

    def store(self, files: list[bytes]) -> None:
        import httpx

        for data in files:
            httpx.post(f"{self.url}/instances", content=data, timeout=30).raise_for_status()

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    pacs = OrthancProcess(tmp_path_factory.mktemp("orthanc")).start()
    yield pacs
    pacs.stop()
