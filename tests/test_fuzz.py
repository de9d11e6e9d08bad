"""Schema-driven fuzzing of every endpoint with schemathesis (pinned in the dev dependencies): its
default checks, with keys required and the key given, against the real app on a real port. Zero
5xx, zero check failures. ``tests/schemathesis.toml`` says which statuses a schema-valid request
may still get, and why."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from service.config import Settings
from tests.embedded import EmbeddedServer
from tests.service_fixtures import write_tiny_model

CONFIG = Path(__file__).with_name("schemathesis.toml")
KEY = "fuzz-key"


def test_schemathesis_finds_no_server_error_and_no_check_failure(tmp_path):
    write_tiny_model(tmp_path / "models", "tiny")
    settings = Settings(model_dir=tmp_path / "models", api_keys=KEY, rate_limit_per_s=0)
    report = tmp_path / "schemathesis.json"
    cli = Path(sys.executable).with_name("schemathesis")
    with EmbeddedServer(settings) as api:
        run = subprocess.run(
            [str(cli), "--config-file", str(CONFIG), "--no-color", "run", f"{api.url}/openapi.json", "--max-examples", "200", "--seed", "7",
             "--workers", "1", "-H", f"Authorization: Bearer {KEY}", "--report", "json", "--report-json-path", str(report)],
            cwd=tmp_path, capture_output=True, text=True, timeout=900,
        )
    result = json.loads(report.read_text())
    rows = []
    for operation, phases in sorted(result["valid_rates"].items()):
        accepted = sum(p["accepted"] for p in phases.values())
        rejected = sum(p["rejected"] for p in phases.values())
        rows.append(f"{operation:40s} accepted {accepted:4d} rejected {rejected:4d}")
    print(f"\nschemathesis: {result['test_cases']['generated']} cases, {result['test_cases']['with_failures']} with failures\n" + "\n".join(rows))
    assert run.returncode == 0, run.stdout[-4000:]
    assert result["failures"] == [] and result["errors"] == []
    assert result["operations"]["tested"] == result["operations"]["total"] >= 7
