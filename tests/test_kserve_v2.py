"""The Open Inference Protocol (``/v2``) as Triton's clients speak it: tritonclient.http against the
real app on a real port, and perf_analyzer (tritonclient 2.51's binary, under ``.venv/tools``)."""

from __future__ import annotations

import os
import subprocess

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from bench.perf_analyzer import PerfAnalyzerMissing, input_data, locate, read_csv
from service.codecs.tensors import HEADER_LENGTH, build_request
from service.config import Settings
from tests.embedded import EmbeddedServer
from tests.service_fixtures import decode_png, grey, png

KEY = "v2-key"


@pytest.fixture(scope="module")
def server(model_dir):
    settings = Settings(model_dir=model_dir, max_upload_bytes=200_000, max_side=256, max_pixels=256 * 200, max_pixel_samples=200_000)
    with EmbeddedServer(settings) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    c = triton.InferenceServerClient(server.url.removeprefix("http://"), network_timeout=60)
    yield c
    c.close()


def tensor(name: str, array: np.ndarray, datatype: str, binary: bool = True) -> triton.InferInput:
    t = triton.InferInput(name, list(array.shape), datatype)
    t.set_data_from_numpy(array, binary_data=binary)
    return t


def infer(client, image: np.ndarray, k: int | None = None, seed: int | None = None, outputs: list[str] | None = None,
          binary: bool = True, datatype: str = "UINT8", **kwargs) -> triton.InferResult:
    inputs = [tensor("image", image, datatype, binary)]
    if k is not None:
        inputs.append(tensor("k", np.array([k], np.int32), "INT32", binary))
    if seed is not None:
        inputs.append(tensor("seed", np.array([seed], np.int64), "INT64", binary))
    requested = None if outputs is None else [triton.InferRequestedOutput(name, binary_data=binary) for name in outputs]
    return client.infer("tiny", inputs, outputs=requested, **kwargs)


def refused(call, *args, **kwargs) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as caught:
        call(*args, **kwargs)
    return caught.value


def test_server_and_model_metadata_health_and_config(client):
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("tiny") and client.is_model_ready("tiny", "1")
    assert not client.is_model_ready("nope") and not client.is_model_ready("tiny", "9")
    server = client.get_server_metadata()
    assert server["name"] == "carseg" and "binary_tensor_data" in server["extensions"]
    meta = client.get_model_metadata("tiny")
    assert meta["name"] == "tiny" and meta["versions"] == ["1"]
    assert [(t["name"], t["datatype"], t["shape"]) for t in meta["inputs"]] == [("image", "UINT8", [-1, -1, 1]), ("k", "INT32", [1]), ("seed", "INT64", [1])]
    assert [(t["name"], t["datatype"], t["shape"]) for t in meta["outputs"]] == [
        ("masks", "UINT8", [-1, -1, -1]), ("probabilities", "FP32", [2, -1, -1]), ("entropy", "FP32", [-1, -1]),
    ]
    assert client.get_model_metadata("tiny", "1") == meta
    config = client.get_model_config("tiny", "1")
    assert config["max_batch_size"] == 0
    assert {i["name"]: (i["data_type"], i.get("optional", False)) for i in config["input"]} == {
        "image": ("TYPE_UINT8", False), "k": ("TYPE_INT32", True), "seed": ("TYPE_INT64", True),
    }
    assert client.get_model_config("tiny") == {**config, "version_policy": {"latest": {"num_versions": 1}}}


def test_json_and_binary_tensors_give_the_same_result(client):
    image = grey(24, 40, seed=1)
    as_json = infer(client, image, k=3, seed=5, outputs=["masks", "probabilities", "entropy"], binary=False)
    as_binary = infer(client, image, k=3, seed=5)  # binary inputs; no outputs named: every output, binary
    json_outputs = as_json.get_response()["outputs"]
    binary_outputs = as_binary.get_response()["outputs"]
    assert all("data" in o and "parameters" not in o for o in json_outputs)
    assert [o["name"] for o in binary_outputs] == ["masks", "probabilities", "entropy"]
    assert all("data" not in o and o["parameters"]["binary_data_size"] > 0 for o in binary_outputs)
    masks, p_f, entropy = (as_binary.as_numpy(n) for n in ("masks", "probabilities", "entropy"))
    assert masks.shape == (3, 24, 40) and masks.dtype == np.uint8 and masks.max() <= 1
    assert p_f.shape == (2, 24, 40) and p_f.dtype == np.float32 and np.allclose(p_f.sum(0), 1, atol=1e-4)
    assert entropy.shape == (24, 40) and np.allclose(entropy, -(p_f * np.log(p_f + 1e-12)).sum(0), atol=1e-5)
    for name in ("masks", "probabilities", "entropy"):  # JSON numbers carry float32 exactly
        assert np.array_equal(as_json.as_numpy(name), as_binary.as_numpy(name)), name
    assert as_binary.get_response()["parameters"] == {"k": 3, "seed": 5}


def test_the_same_seed_gives_the_masks_of_v1(server, client):
    image = grey(33, 47, seed=2)
    v1 = httpx.post(f"{server.url}/v1/models/tiny/samples", files={"image": ("x.png", png(image))}, params={"k": 6, "seed": 123}, timeout=60)
    assert v1.status_code == 200, v1.text
    v1_masks = np.stack([decode_png(m) for m in v1.json()["masks"]])
    v2_masks = infer(client, image, k=6, seed=123, outputs=["masks"]).as_numpy("masks")
    assert len({m.tobytes() for m in v2_masks}) > 1  # six samples, not one mask six times
    assert np.array_equal(v1_masks, v2_masks)


def test_only_the_requested_outputs_come_back(client):
    result = infer(client, grey(16, 16), k=2, seed=1, outputs=["entropy"])
    assert [o["name"] for o in result.get_response()["outputs"]] == ["entropy"]
    assert result.as_numpy("masks") is None and result.as_numpy("entropy").shape == (16, 16)
    mixed = infer(client, grey(16, 16), k=2, seed=1, outputs=["probabilities", "masks"], binary=False)
    assert [o["name"] for o in mixed.get_response()["outputs"]] == ["probabilities", "masks"]


def test_k_and_seed_are_inputs_and_a_drawn_seed_reproduces(client):
    image = grey(20, 20, seed=3)
    drawn = infer(client, image, k=5)
    seed = drawn.get_response()["parameters"]["seed"]
    assert drawn.as_numpy("masks").shape == (5, 20, 20) and isinstance(seed, int)
    assert np.array_equal(infer(client, image, k=5, seed=seed).as_numpy("masks"), drawn.as_numpy("masks"))
    default_k = infer(client, image, seed=1, outputs=["masks"]).as_numpy("masks")
    assert default_k.shape[0] == 16  # the service's default k
    as_int64 = client.infer("tiny", [tensor("image", image, "UINT8"), tensor("k", np.array([4], np.int64), "INT64")])
    assert as_int64.as_numpy("masks").shape == (4, 20, 20)
    for k in (0, 65):
        error = refused(infer, client, image, k=k)
        assert error.status() == "422" and "k must be between 1 and 64" in error.message()
    assert refused(infer, client, image, seed=-1).status() == "422"


def test_image_shapes_and_datatypes_give_the_same_masks(client):
    image = grey(18, 22, seed=4)
    reference = infer(client, image, k=3, seed=9, outputs=["masks"]).as_numpy("masks")
    variants = {
        "H,W,1": (image[:, :, None], "UINT8"), "1,H,W,1": (image[None, :, :, None], "UINT8"), "1,H,W": (image[None], "UINT8"),
        "UINT16": (image.astype(np.uint16) * 257, "UINT16"), "FP32": (image.astype(np.float32) / 255, "FP32"),
    }
    for label, (array, datatype) in variants.items():
        masks = infer(client, array, k=3, seed=9, outputs=["masks"], datatype=datatype).as_numpy("masks")
        assert np.array_equal(masks, reference), label
    error = refused(infer, client, np.full((8, 8), 1.5, np.float32), datatype="FP32")
    assert error.status() == "422" and "[0, 1]" in error.message()
    nan = np.zeros((8, 8), np.float32)
    nan[0, 0] = np.nan
    assert refused(infer, client, nan, datatype="FP32").status() == "422"
    assert refused(infer, client, np.zeros((8, 8, 3), np.uint8)).status() == "422"  # a 1-channel model
    assert refused(infer, client, np.zeros((2, 8, 8, 1), np.uint8)).status() == "422"  # a batch of 2


def test_errors_come_back_as_inference_server_exceptions(client):
    image = grey(32, 32)
    unknown = refused(client.infer, "nope", [tensor("image", image, "UINT8")])
    assert unknown.status() == "404" and unknown.message().startswith("model_not_found: ")
    assert refused(client.infer, "tiny", [tensor("image", image, "UINT8")], model_version="9").status() == "404"
    assert refused(client.get_model_metadata, "nope").status() == "404"

    wrong_type = refused(infer, client, image.astype(np.int32), datatype="INT32")
    assert wrong_type.status() == "422" and "UINT8, UINT16, FP32" in wrong_type.message()
    boolean = refused(client.infer, "tiny", [tensor("image", image > 128, "BOOL")])
    assert boolean.status() == "422" and "BOOL is not supported" in boolean.message()

    for binary in (True, False):  # the data a tensor carries is not what its shape says
        mismatched = tensor("image", image, "UINT8", binary)
        mismatched.set_shape([32, 31])
        error = refused(client.infer, "tiny", [mismatched])
        assert error.status() == "400" and ("binary_data_size is 1024 bytes" if binary else "data holds 1024 values") in error.message()

    missing = refused(client.infer, "tiny", [tensor("k", np.array([2], np.int32), "INT32")])
    assert missing.status() == "400" and "no input 'image'" in missing.message()
    extra = refused(client.infer, "tiny", [tensor("image", image, "UINT8"), tensor("mask", image, "UINT8")])
    assert extra.status() == "400" and "unknown inputs ['mask']" in extra.message()
    assert refused(infer, client, image, outputs=["samples"]).status() == "400"
    assert refused(infer, client, image, request_compression_algorithm="gzip").status() == "415"
    assert refused(infer, client, np.zeros((300, 4), np.uint8)).status() == "413"  # max_side 256
    assert refused(infer, client, grey(100, 100), k=32).status() == "413"  # pixels x k over the cost limit


def post(server, body: bytes, headers: dict[str, str]) -> httpx.Response:
    return httpx.post(f"{server.url}/v2/models/tiny/infer", content=body, headers=headers, timeout=60)


def test_malformed_bodies_are_refused_in_the_protocols_shape(server):
    image = grey(8, 8)
    body, headers = build_request([("image", image, True)])
    cases = {
        "trailing bytes": (body + b"xx", headers, 400, "add up to 64 bytes but 66"),
        "a short body": (body[:-1], headers, 400, "run past the end"),
        "header past the body": (body, {**headers, HEADER_LENGTH: str(len(body) + 1)}, 400, "holds only"),
        "header not a number": (body, {**headers, HEADER_LENGTH: "-3"}, 400, "non-negative integer"),
        "binary without the header": (body, {"Content-Type": "application/octet-stream"}, 400, "not valid JSON"),
        "not JSON": (b"{", {}, 400, "not valid JSON"),
        "nested too deeply": (b"[" * 100_000, {}, 400, "nested too deeply"),
        "no inputs": (b'{"inputs": []}', {}, 400, "non-empty list"),
        "negative dimension": (b'{"inputs": [{"name": "image", "datatype": "UINT8", "shape": [-8, 8], "data": []}]}', {}, 400, "negative"),
        "strings as data": (b'{"inputs": [{"name": "image", "datatype": "UINT8", "shape": [1, 2], "data": ["a", "b"]}]}', {}, 422, "integers"),
        "out of range": (b'{"inputs": [{"name": "image", "datatype": "UINT8", "shape": [1, 2], "data": [0, 256]}]}', {}, 422, "do not fit"),
        "ragged data": (b'{"inputs": [{"name": "image", "datatype": "UINT8", "shape": [2, 2], "data": [[1, 2], [3]]}]}', {}, 400, "regular"),
        "a form": (b"image=1", {"Content-Type": "application/x-www-form-urlencoded"}, 415, "application/json"),
        "huge shape": (b'{"inputs": [{"name": "image", "datatype": "FP64", "shape": [100000, 100000], "data": []}]}', {}, 413, "over the limit"),
        "shared memory": (b'{"inputs": [{"name": "image", "datatype": "UINT8", "shape": [1], "parameters": {"shared_memory_region": "r"}}]}',
                          {}, 400, "not supported"),
    }
    for label, (data, hdrs, status, text) in cases.items():
        r = post(server, data, hdrs)
        assert r.status_code == status, (label, r.status_code, r.text)
        assert list(r.json()) == ["error"] and text in r.json()["error"], (label, r.text)
    # nested data is row-major too; without binary_data_output every output comes back as JSON
    nested = b'{"inputs": [{"name": "image", "datatype": "UINT8", "shape": [8, 8], "data": %s}], "outputs": []}' % str(image.tolist()).encode()
    r = post(server, nested, {"Content-Type": "application/json"})
    assert r.status_code == 200 and r.headers["content-type"] == "application/json" and HEADER_LENGTH not in r.headers
    assert [(o["name"], o["shape"], len(o["data"])) for o in r.json()["outputs"]] == [
        ("masks", [16, 8, 8], 1024), ("probabilities", [2, 8, 8], 128), ("entropy", [8, 8], 64),
    ]
    body, headers = build_request([("image", image, False), ("seed", np.array([1], np.int64), False)], parameters={"binary_data_output": True})
    r = post(server, body, headers)
    assert r.status_code == 200 and r.headers["content-type"] == "application/octet-stream"
    assert len(r.content) == int(r.headers[HEADER_LENGTH]) + 16 * 64 + 2 * 64 * 4 + 64 * 4


def test_keys_and_rate_limits_answer_with_their_headers(model_dir):
    settings = Settings(model_dir=model_dir, api_keys=KEY, rate_limit_per_s=0.01, rate_limit_burst=1)
    with EmbeddedServer(settings) as srv:
        host = srv.url.removeprefix("http://")
        anonymous = triton.InferenceServerClient(host)
        assert anonymous.is_server_live() and anonymous.is_server_ready()  # probes need no key, as /health
        assert refused(anonymous.get_model_metadata, "tiny").status() == "401"
        r = httpx.get(f"{srv.url}/v2/models/tiny")
        assert r.status_code == 401 and "Bearer" in r.headers["www-authenticate"] and r.json()["error"].startswith("unauthorized: ")
        keyed = triton.InferenceServerClient(host)
        auth = {"Authorization": f"Bearer {KEY}"}
        assert keyed.get_model_metadata("tiny", headers=auth)["name"] == "tiny"
        # a copy: tritonclient writes its Inference-Header-Content-Length into the dict it is given
        assert infer(keyed, grey(8, 8), k=1, headers=dict(auth)).as_numpy("masks").shape == (1, 8, 8)
        body, headers = build_request([("image", grey(8, 8), True)])
        limited = httpx.post(f"{srv.url}/v2/models/tiny/infer", content=body, headers={**headers, **auth})  # the one token is spent
        assert limited.status_code == 429 and int(limited.headers["retry-after"]) >= 1
        assert limited.json()["error"].startswith("rate_limited: ")
        anonymous.close()
        keyed.close()


def test_perf_analyzer_measures_the_v2_endpoint(server, tmp_path):
    try:
        tool = locate()
    except PerfAnalyzerMissing as exc:
        if os.environ.get("CI"):
            pytest.fail(f"{exc} (under CI a missing program is a failure, not a skip)")
        pytest.skip(str(exc))

    def served() -> float:
        text = httpx.get(f"{server.url}/metrics", timeout=10).text
        prefix = 'carseg_request_duration_seconds_count{method="POST",route="/v2/models/{model_name}/infer",status="200"}'
        return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(prefix))

    before = served()
    data = input_data(tmp_path / "input.json", grey(64, 64)[:, :, None], k=2)
    report = tmp_path / "report.csv"
    command = tool.command(server.url, "tiny", data, 1, "--request-count", "40", "-f", str(report))
    run = subprocess.run(command, env=tool.env, capture_output=True, text=True, timeout=120)
    output = run.stdout + run.stderr
    assert run.returncode == 0, output
    assert "error" not in output.lower(), output
    row = read_csv(report)
    assert row["requests_per_s"] > 0 and 0 < row["p50_ms"] <= row["p99_ms"], row
    assert served() - before >= 40  # the requests reached the route and were answered 200
