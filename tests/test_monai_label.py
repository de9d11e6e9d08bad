"""MONAI Label's own Python client (``monailabel.client.MONAILabelClient``, the code its Slicer
plugin is built on) against carseg: ``info()``, ``infer()`` with a file and with a session, the
label read back by nibabel and pynrrd (the NRRD OHIF's extension asks for) on the input's grid."""

from __future__ import annotations

import gzip
import io
import json

import httpx
import nibabel as nib
import numpy as np
import pydicom
import pytest
from monailabel.client import MONAILabelClient
from monailabel.client.client import MONAILabelClientException, MONAILabelUtils

from service.config import Settings
from tests.embedded import EmbeddedServer
from tests.medical_fixtures import ct_series, nifti_bytes, nodule_volume

K, SEED = 5, 21
AFFINE = np.array([[0.0, -0.8, 0, 10.0], [0.9, 0, 0, -20.0], [0, 0, 2.0, 30.0], [0, 0, 0, 1]])


@pytest.fixture(scope="module")
def server(model_dir):
    with EmbeddedServer(Settings(model_dir=model_dir, max_side=256, max_pixels=256 * 256)) as srv:
        yield srv


def test_login_is_off_where_no_keys_are_required(server):
    assert MONAILabelClient(server.url).auth_enabled() is False


@pytest.fixture(scope="module")
def volume_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("images") / "case.nii.gz"
    path.write_bytes(nifti_bytes(nodule_volume(4, 32).transpose(1, 2, 0).astype(np.int16), AFFINE))
    return path


def majority_of_samples(server, data: bytes) -> np.ndarray:
    """The samples of the same image and seed from carseg's own API, reduced to their majority."""
    r = httpx.post(f"{server.url}/v1/models/tiny/samples", files={"image": ("x", data)}, params={"k": K, "seed": SEED, "format": "nifti"},
                   timeout=60)
    assert r.status_code == 200, r.text
    samples = np.asarray(nib.Nifti1Image.from_bytes(gzip.decompress(r.content)).dataobj)
    return (samples.sum(axis=-1) * 2 > K).astype(np.uint8)


def test_info_is_shaped_as_monai_label_answers_it(server):
    info = MONAILabelClient(server.url).info()
    assert info["name"] == "carseg" and info["labels"] == ["nodule"]
    assert set(info) >= {"models", "trainers", "strategies", "scoring", "train_stats", "datastore", "version"}
    model = info["models"]["tiny"]
    assert model["type"] == "segmentation" and model["labels"] == {"nodule": 1} and model["dimension"] == 3
    assert model["config"]["k"] == 16


def test_infer_with_a_file_returns_the_majority_label_on_the_input_grid(server, volume_file, tmp_path):
    client = MONAILabelClient(server.url, tmpdir=str(tmp_path))
    label_path, params = client.infer("tiny", "", {"k": K, "seed": SEED}, file=str(volume_file))
    label = nib.load(label_path)
    np.testing.assert_allclose(label.affine, AFFINE, atol=1e-6)
    assert label.shape == (32, 32, 4) and label.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(np.asarray(label.dataobj), majority_of_samples(server, volume_file.read_bytes()))
    assert params["label_names"] == {"nodule": 1} and set(params["latencies"]) >= {"pre", "infer", "post", "write", "total"} - {"post"}
    summary = params["carseg"]
    assert (summary["k"], summary["seed"]) == (K, SEED) and len(summary["sample_volumes_ml"]["nodule"]) == K


def test_a_session_serves_a_dicom_series_uploaded_once(server, tmp_path):
    folder = tmp_path / "series"
    folder.mkdir()
    paths = []
    for i, data in enumerate(ct_series(depth=3, size=32)):
        paths.append(folder / f"IM{i}.dcm")
        paths[-1].write_bytes(data)
    client = MONAILabelClient(server.url, tmpdir=str(tmp_path))
    url = f"{server.url}/session/"
    response = httpx.put(url, files=[("files", (p.name, p.read_bytes())) for p in paths], timeout=30)  # Slicer's multi-file upload
    assert response.status_code == 200, response.text
    session_id = response.json()["session_id"]
    assert client.get_session(session_id)["meta"]["files"] == [p.name for p in paths]
    label_path, params = client.infer("tiny", "", {"k": K, "seed": SEED}, session_id=session_id)
    label = nib.load(label_path)
    assert label.shape == (32, 32, 3)
    voxel_ml = 0.7 * 0.8 * 2.5 / 1000  # the series' spacing gives each sample's lesion volume in mL
    volumes = params["carseg"]["sample_volumes_ml"]["nodule"]
    assert volumes == [round(a * voxel_ml, 4) for a in params["carseg"]["sample_areas_px"]["nodule"]]
    np.testing.assert_allclose(np.diag(label.affine)[:3], (-0.8, -0.7, 2.5), atol=1e-5)  # the series' spacing, LPS -> RAS
    # the client's own create_session (one file) works the same way
    single = client.create_session(str(paths[0]))["session_id"]
    assert client.infer("tiny", "", {"k": 2}, session_id=single)[0] is not None
    client.remove_session(session_id)
    with pytest.raises(MONAILabelClientException, match="404"):
        client.infer("tiny", "", {"k": K}, session_id=session_id)


def test_slicer_uploads_an_image_by_id_then_segments_it(server, volume_file, tmp_path):
    client = MONAILabelClient(server.url, tmpdir=str(tmp_path))
    assert client.upload_image(str(volume_file), "case-7") == {"image": "case-7"}
    assert httpx.head(f"{server.url}/datastore/image", params={"image": "case-7"}, timeout=30).status_code == 200
    assert client.info()["datastore"]["total"] >= 1
    label_path, _ = client.infer("tiny", "case-7", {"k": K, "seed": SEED})
    np.testing.assert_array_equal(np.asarray(nib.load(label_path).dataobj), majority_of_samples(server, volume_file.read_bytes()))
    assert httpx.head(f"{server.url}/datastore/image", params={"image": "case-8"}, timeout=30).status_code == 404


def test_ohif_asks_for_nrrd_and_gets_it(server, volume_file, tmp_path):
    params = {"k": K, "seed": SEED, "result_extension": ".nrrd", "result_dtype": "uint16", "result_compress": False}
    status, _form, files, _ = MONAILabelUtils.http_multipart(
        "POST", server.url, "/infer/tiny?image=&output=all", {"params": json.dumps(params)}, {"file": str(volume_file)},
    )
    assert status == 200 and list(files) == ["label.nrrd"]
    data, header = read_nrrd(files["label.nrrd"], tmp_path)
    assert header["type"] == "uint16" and header["encoding"] == "raw" and data.dtype == np.uint16 and data.shape == (32, 32, 4)
    np.testing.assert_array_equal(data, majority_of_samples(server, volume_file.read_bytes()))
    # NRRD's space is LPS: x and y of the RAS affine change sign
    lps = np.diag([-1.0, -1.0, 1.0]) @ AFFINE[:3]
    np.testing.assert_allclose(header["space directions"], lps[:, :3].T, atol=1e-6)
    np.testing.assert_allclose(header["space origin"], lps[:, 3], atol=1e-6)


def read_nrrd(content: bytes | str, folder) -> tuple[np.ndarray, dict]:
    """pynrrd reads files: the bytes as the client received them, through one."""
    import nrrd

    path = folder / "label.nrrd"
    path.write_bytes(content if isinstance(content, bytes) else content.encode("latin-1"))
    return nrrd.read(str(path))


def test_output_modes_and_samples_through_params(server, volume_file):
    url = f"{server.url}/infer/tiny"
    files = {"file": ("case.nii.gz", volume_file.read_bytes())}
    as_json = httpx.post(url, params={"output": "json"}, files=files, data={"params": json.dumps({"k": K, "seed": SEED})}, timeout=60)
    assert as_json.status_code == 200 and as_json.json()["label_names"] == {"nodule": 1}
    image = httpx.post(url, params={"output": "image"}, files=files, data={"params": json.dumps({"k": K, "seed": SEED})}, timeout=60)
    assert image.status_code == 200
    np.testing.assert_array_equal(np.asarray(nib.Nifti1Image.from_bytes(gzip.decompress(image.content)).dataobj),
                                  majority_of_samples(server, volume_file.read_bytes()))
    status, form, parts, _ = MONAILabelUtils.http_multipart(
        "POST", server.url, "/infer/tiny?output=all", {"params": json.dumps({"k": K, "seed": SEED, "samples": True})},
        {"file": str(volume_file)},
    )
    assert status == 200 and list(parts) == ["label.nii.gz", "samples.nii.gz", "mean.nii.gz"]
    samples = nib.Nifti1Image.from_bytes(gzip.decompress(parts["samples.nii.gz"]))
    assert samples.shape == (32, 32, 4, K)
    mean = np.asarray(nib.Nifti1Image.from_bytes(gzip.decompress(parts["mean.nii.gz"])).dataobj)
    np.testing.assert_allclose(mean[..., 0], np.asarray(samples.dataobj).mean(-1), atol=1e-6)
    assert json.loads(form["params"])["carseg"]["files"] == list(parts)


def test_bad_requests_are_clear(server, volume_file):
    url = f"{server.url}/infer/tiny"
    files = {"file": ("case.nii.gz", volume_file.read_bytes())}
    assert httpx.post(url, files=files, data={"params": "{not json"}, timeout=30).status_code == 422
    assert httpx.post(url, files=files, data={"params": json.dumps({"k": "many"})}, timeout=30).status_code == 422
    assert httpx.post(url, files=files, data={"params": json.dumps({"result_extension": ".mha"})}, timeout=30).status_code == 422
    no_store = httpx.post(url, params={"image": "spleen_10"}, data={"params": "{}"}, timeout=30)
    assert no_store.status_code == 400 and "CARSEG_DICOMWEB_URL" in no_store.json()["detail"]
    assert httpx.post(f"{server.url}/infer/nope", files=files, timeout=30).status_code == 404
    pinned = {"params": json.dumps({"k": 2, "version": "1"})}
    assert httpx.post(url, params={"output": "json"}, files=files, data=pinned, timeout=30).json()["carseg"]["version"] == "1"
    missing = httpx.post(url, files=files, data={"params": json.dumps({"version": "2"})}, timeout=30)
    assert missing.status_code == 404 and missing.json()["error"] == "model_not_found"
    assert httpx.get(f"{server.url}/session/unknown", timeout=30).status_code == 404


def test_the_client_sends_its_key_where_keys_are_required(model_dir, volume_file, tmp_path):
    settings = Settings(model_dir=model_dir, api_keys="s3cret-key-for-viewers")
    with EmbeddedServer(settings) as srv:
        with pytest.raises(MONAILabelClientException, match="401"):
            MONAILabelClient(srv.url).infer("tiny", "", {"k": 2}, file=str(volume_file))
        client = MONAILabelClient(srv.url, tmpdir=str(tmp_path))
        assert client.auth_enabled()
        with pytest.raises(MONAILabelClientException, match="401"):
            client.auth_token("radiologist", "not-a-key")
        client.update_auth(client.auth_token("radiologist", "s3cret-key-for-viewers"))  # the login Slicer's plugin shows
        assert client.auth_valid_token()
        assert client.info()["models"]["tiny"]["type"] == "segmentation"
        assert client.infer("tiny", "", {"k": 2}, file=str(volume_file))[0] is not None


def test_ohif_names_a_series_in_the_pacs_and_carseg_fetches_it(model_dir, orthanc, tmp_path):
    """OHIF's MONAI Label extension sends only the SeriesInstanceUID it shows; carseg retrieves the
    series from the same PACS (QIDO-RS + WADO-RS), as MONAI Label's DICOMweb datastore does."""
    import nrrd  # noqa: F401 - read_nrrd needs it

    files = ct_series(depth=3, size=32)
    orthanc.store(files)
    series_uid = pydicom.dcmread(io.BytesIO(files[0])).SeriesInstanceUID
    settings = Settings(model_dir=model_dir, dicomweb_url=f"{orthanc.url}/dicom-web")
    with EmbeddedServer(settings) as srv:
        params = {"k": K, "seed": SEED, "result_extension": ".nrrd", "result_dtype": "uint16", "result_compress": False}
        status, _form, parts, _ = MONAILabelUtils.http_multipart(
            "POST", srv.url, f"/infer/tiny?image={series_uid}&output=all", {"params": json.dumps(params)}, {},
        )
        assert status == 200, _form
        label, header = read_nrrd(parts["label.nrrd"], tmp_path)
        direct = httpx.post(f"{srv.url}/v1/models/tiny/samples", files=[("image", (f"{i}", f)) for i, f in enumerate(files)],
                            params={"k": K, "seed": SEED, "format": "nifti"}, timeout=60)
        samples = np.asarray(nib.Nifti1Image.from_bytes(gzip.decompress(direct.content)).dataobj)
        np.testing.assert_array_equal(label, (samples.sum(-1) * 2 > K).astype(np.uint16))
        np.testing.assert_allclose(np.diag(header["space directions"]), (0.8, 0.7, 2.5), atol=1e-5)  # LPS: no sign change
        missing = httpx.post(f"{srv.url}/infer/tiny", params={"image": "1.2.3.4.5"}, data={"params": "{}"}, timeout=30)
        assert missing.status_code == 404 and missing.json()["error"] == "series_not_found"
        assert httpx.post(f"{srv.url}/infer/tiny", params={"image": "../etc"}, data={"params": "{}"}, timeout=30).status_code == 404
    with EmbeddedServer(Settings(model_dir=model_dir, dicomweb_url="http://127.0.0.1:9/dicom-web")) as srv:
        down = httpx.post(f"{srv.url}/infer/tiny", params={"image": series_uid}, data={"params": "{}"}, timeout=30)
        assert down.status_code == 502 and down.json()["error"] == "pacs_unavailable"
