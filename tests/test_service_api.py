import asyncio
import io

import httpx
import numpy as np
import pytest

from service.config import Settings
from tests.embedded import EmbeddedServer
from tests.service_fixtures import b64, decode_png, grey, npy, png


@pytest.fixture(scope="module")
def server(model_dir):
    settings = Settings(model_dir=model_dir, max_upload_bytes=200_000, max_side=256, max_pixels=256 * 200)
    with EmbeddedServer(settings) as srv:
        yield srv


def post(server, data: bytes, route="samples", model="tiny", **params):
    return httpx.post(f"{server.url}/v1/models/{model}/{route}", files={"image": ("x", data)}, params=params, timeout=30)


def test_health_and_model_listing(server):
    assert httpx.get(f"{server.url}/health/live").json() == {"status": "ok"}
    assert httpx.get(f"{server.url}/health/ready").status_code == 200
    models = httpx.get(f"{server.url}/v1/models").json()["models"]
    assert models == [{"name": "tiny", "version": "1", "versions": ["1"], "classes": ["background", "nodule"]}]
    detail = httpx.get(f"{server.url}/v1/models/tiny").json()
    assert detail["input"]["channels"] == 1 and set(detail["sha256"]) == {"calibration.safetensors", "refinement.safetensors"}
    assert detail["input"]["sees_position"] is False  # its F was built before position existed
    assert detail["metrics"]["validation"]["ged"] == 0.5
    assert httpx.get(f"{server.url}/v1/models/nope").status_code == 404
    assert "/v1/models/{name}/samples" in httpx.get(f"{server.url}/openapi.json").json()["paths"]


def test_a_model_that_sees_position_says_so_and_serves_any_size(tmp_path):
    from tests.service_fixtures import write_tiny_model

    write_tiny_model(tmp_path, "framed", position=True)
    with EmbeddedServer(Settings(model_dir=tmp_path)) as srv:
        assert httpx.get(f"{srv.url}/v1/models/framed").json()["input"]["sees_position"] is True
        r = post(srv, png(grey(37, 53)), model="framed", k=3, seed=1)
        assert r.status_code == 200, r.text
        assert [decode_png(m).shape for m in r.json()["masks"]] == [(37, 53)] * 3


def test_samples_multipart_returns_k_masks_of_the_input_size(server):
    r = post(server, png(grey(37, 53)), k=5, seed=11)
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["model"], body["version"], body["k"], body["seed"]) == ("tiny", "1", 5, 11)
    assert (body["height"], body["width"]) == (37, 53)
    masks = [decode_png(m) for m in body["masks"]]
    assert len(masks) == 5 and all(m.shape == (37, 53) and m.dtype == np.uint8 and m.max() <= 1 for m in masks)


def test_json_body_gives_the_same_masks_as_multipart_for_the_same_seed(server):
    data = png(grey(32, 32, seed=3))
    multipart = post(server, data, k=4, seed=99).json()
    as_json = httpx.post(f"{server.url}/v1/models/tiny/samples", json={"image": b64(data), "k": 4, "seed": 99}, timeout=30).json()
    assert multipart["masks"] == as_json["masks"]
    unseeded = post(server, data, k=2).json()
    assert isinstance(unseeded["seed"], int)  # a drawn seed is returned so the result can be reproduced


def test_samples_npz(server):
    r = httpx.post(
        f"{server.url}/v1/models/tiny/samples", files={"image": ("x", png(grey(24, 40)))}, params={"k": 3},
        headers={"Accept": "application/x-npz"}, timeout=30,
    )
    assert r.status_code == 200 and r.headers["content-type"] == "application/x-npz"
    z = np.load(io.BytesIO(r.content))
    assert z["masks"].shape == (3, 24, 40) and z["masks"].dtype == np.uint8
    assert z["probabilities"].shape == (2, 24, 40) and z["probabilities"].dtype == np.float32
    assert np.allclose(z["probabilities"].sum(0), 1, atol=1e-4)
    assert z["entropy"].shape == (24, 40)


def test_uncertainty_json_with_preview_and_npz(server):
    r = post(server, png(grey(20, 28)), route="uncertainty", k=6, seed=1, preview="true")
    assert r.status_code == 200, r.text
    body = r.json()
    arrays = {k: np.load(io.BytesIO(__import__("base64").b64decode(v))) for k, v in body["arrays"].items()}
    assert arrays["probabilities"].shape == (2, 20, 28)
    for key in ("aleatoric_entropy", "sample_entropy", "mutual_information", "sample_variance"):
        assert arrays[key].shape == (20, 28) and arrays[key].dtype == np.float32
    p_f = arrays["probabilities"]
    assert np.allclose(arrays["aleatoric_entropy"], -(p_f * np.log(p_f + 1e-12)).sum(0), atol=1e-5)
    # MI = H(mean) - mean H(sample) and H >= 0: MI can never exceed the sample entropy
    assert (arrays["mutual_information"] <= arrays["sample_entropy"] + 1e-6).all()
    assert decode_png(body["preview"]).shape == (20, 28, 3)

    def npz(route):
        r = httpx.post(f"{server.url}/v1/models/tiny/{route}", files={"image": ("x", png(grey(20, 28)))}, params={"k": 6, "seed": 1},
                       headers={"Accept": "application/x-npz"}, timeout=30)
        return np.load(io.BytesIO(r.content))

    z = npz("uncertainty")
    assert np.array_equal(z["sample_entropy"], arrays["sample_entropy"])
    samples = npz("samples")  # the same image and seed through the other route: the same p_F and H(p_F)
    assert np.array_equal(samples["probabilities"], p_f) and np.array_equal(samples["entropy"], arrays["aleatoric_entropy"])


def test_sixteen_bit_png_and_npy_inputs(server):
    img16 = (grey(16, 16).astype(np.uint16) * 257)
    assert post(server, png(img16), k=2).status_code == 200
    assert post(server, npy(grey(16, 16)), k=2).status_code == 200
    assert post(server, npy(grey(16, 16).astype(np.float32) / 255), k=2).status_code == 200
    rgb_grey = np.repeat(grey(16, 16)[:, :, None], 3, axis=2)  # grey exported as RGB is accepted
    assert post(server, png(rgb_grey), k=2).status_code == 200


def test_request_shape_errors(server):
    url = f"{server.url}/v1/models/tiny/samples"
    assert httpx.post(url, content=b"raw", headers={"content-type": "image/png"}).status_code == 415
    assert httpx.post(url, files={"other": ("x", b"1")}).json()["error"] == "invalid_request"
    assert httpx.post(url, json={"image": "***"}).json()["error"] == "invalid_request"
    assert httpx.post(url, json={"nope": 1}).status_code == 422
    big = httpx.post(url, files={"image": ("x", b"\x89PNG\r\n\x1a\n" + b"0" * 400_000)})
    assert big.status_code == 413 and big.json()["error"] == "payload_too_large"
    assert post(server, png(grey()), model="missing").json()["error"] == "model_not_found"
    assert post(server, png(grey()), version="7").status_code == 404


def test_thirty_two_concurrent_requests_are_all_answered(server):
    async def run():
        async with httpx.AsyncClient(timeout=60) as client:
            async def one(i):
                files = {"image": ("x", png(grey(24 + i % 3, 24, seed=i)))}
                return await client.post(f"{server.url}/v1/models/tiny/samples", files=files, params={"k": 1 + i % 4, "seed": i})
            return await asyncio.gather(*(one(i) for i in range(32)))

    responses = asyncio.run(run())
    assert all(r.status_code == 200 for r in responses)
    for i, r in enumerate(responses):
        body = r.json()
        assert body["k"] == 1 + i % 4 and len(body["masks"]) == body["k"] and body["height"] == 24 + i % 3


def test_metrics_move(server):
    before = httpx.get(f"{server.url}/metrics").text
    post(server, png(grey()), k=2)
    post(server, b"junk")
    after = httpx.get(f"{server.url}/metrics").text

    def value(text, prefix):
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(prefix))

    ok = 'carseg_request_duration_seconds_count{method="POST",route="/v1/models/{name}/samples",status="200"}'
    assert value(after, ok) == value(before, ok) + 1
    assert value(after, 'carseg_errors_total{reason="unsupported_media_type"}') == value(before, 'carseg_errors_total{reason="unsupported_media_type"}') + 1
    for name in ("carseg_queue_wait_seconds_count", "carseg_compute_seconds_count", "carseg_batch_samples_count", "carseg_encode_seconds_count"):
        assert value(after, name) > value(before, name), name
    assert "carseg_requests_in_flight" in after and "carseg_queue_depth" in after


def test_same_seed_same_masks_alone_and_inside_a_batch(model_dir):
    # a long batching window makes the concurrent requests share sampler calls
    settings = Settings(model_dir=model_dir, batch_max_delay_ms=300, batch_max_samples=64)
    with EmbeddedServer(settings) as srv:
        target = png(grey(32, 32, seed=5))
        alone = post(srv, target, k=8, seed=1234).json()["masks"]

        async def run():
            async with httpx.AsyncClient(timeout=60) as client:
                async def one(data, seed, k):
                    return await client.post(f"{srv.url}/v1/models/tiny/samples", files={"image": ("x", data)}, params={"k": k, "seed": seed})
                others = [one(png(grey(32, 32, seed=i)), i, 1 + i % 8) for i in range(6)]
                return await asyncio.gather(one(target, 1234, 8), *others)

        batched = asyncio.run(run())
        metrics = httpx.get(f"{srv.url}/metrics").text
    assert batched[0].json()["masks"] == alone
    jobs_per_batch = [line for line in metrics.splitlines() if line.startswith("carseg_batch_jobs_sum")]
    batches = [line for line in metrics.splitlines() if line.startswith("carseg_batch_jobs_count")]
    assert float(jobs_per_batch[0].split()[1]) > float(batches[0].split()[1])  # some batch held more than one job
