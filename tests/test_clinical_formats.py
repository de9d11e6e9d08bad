"""DICOM and NIfTI in, NIfTI and DICOM SEG out, through the HTTP API and read back by the libraries
a clinical user reads them with (pydicom, highdicom, nibabel): geometry and identifiers carried
through, the masks where the input's voxels are, and clear 4xx answers for broken files."""

from __future__ import annotations

import gzip
import io
import struct
import zipfile

import httpx
import nibabel as nib
import numpy as np
import pydicom
import pytest

from service.codecs.volume import Window
from service.config import Settings
from tests.embedded import EmbeddedServer
from tests.medical_fixtures import FRAME_OF_REFERENCE, PATIENT, STUDY_UID, ct_series, ct_slice, nifti_bytes, nodule_volume
from tests.service_fixtures import decode_png, npy, png

K, SEED = 3, 1234


@pytest.fixture(scope="module")
def server(model_dir):
    settings = Settings(model_dir=model_dir, max_side=256, max_pixels=256 * 256, max_slices=32, max_volume_pixel_samples=64 * 64 * 16 * 4)
    with EmbeddedServer(settings) as srv:
        yield srv


def post(server, files, route="samples", **params) -> httpx.Response:
    parts = [("image", (f"f{i}", data)) for i, data in enumerate(files)]
    return httpx.post(f"{server.url}/v1/models/tiny/{route}", files=parts, params={"k": K, "seed": SEED, **params}, timeout=60)


def per_slice_masks(server, slices: np.ndarray) -> np.ndarray:
    """(D, H, W) float32 in [0, 1] -> (D, k, H, W): each slice sent alone as .npy with seed + d."""
    out = []
    for d, image in enumerate(slices):
        r = httpx.post(f"{server.url}/v1/models/tiny/samples", files={"image": ("x", npy(image.astype(np.float32)))},
                       params={"k": K, "seed": SEED + d}, timeout=30)
        assert r.status_code == 200, r.text
        out.append([decode_png(m) for m in r.json()["masks"]])
    return np.asarray(out)


def read_nifti(data: bytes) -> nib.Nifti1Image:
    return nib.Nifti1Image.from_bytes(gzip.decompress(data))


def test_one_dicom_instance_is_windowed_like_the_manifest_says_and_segmented_as_that_image(server):
    hu = nodule_volume(1, 48)[0]
    data = ct_slice(hu, 0)
    r = post(server, [data])
    assert r.status_code == 200, r.text
    # the tiny model declares no window: the instance's own (-600 / 1500) applies to HU = stored - 1024
    expected = Window(-600.0, 1500.0).apply(np.round(hu))
    assert r.json()["masks"] == [m for m in post_npy(server, expected)]


def post_npy(server, image: np.ndarray) -> list[str]:
    r = httpx.post(f"{server.url}/v1/models/tiny/samples", files={"image": ("x", npy(image.astype(np.float32)))},
                   params={"k": K, "seed": SEED}, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()["masks"]


def test_a_shuffled_dicom_series_becomes_a_nifti_on_the_scanner_geometry(server):
    files = ct_series(depth=5, size=40, spacing=(0.7, 0.8), thickness=2.5, origin=(-40.0, -30.0, 100.0))
    shuffled = [files[i] for i in (3, 0, 4, 1, 2)]
    r = post(server, shuffled, format="nifti")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/x-nifti" and r.headers["x-carseg-seed"] == str(SEED)
    image = read_nifti(r.content)
    assert image.shape == (40, 40, 5, K) and image.get_data_dtype() == np.uint8
    # DICOM LPS -> NIfTI RAS: x and y change sign; columns advance by the column spacing, slices by the thickness
    expected = np.array([[-0.8, 0, 0, 40.0], [0, -0.7, 0, 30.0], [0, 0, 2.5, 100.0], [0, 0, 0, 1]])
    np.testing.assert_allclose(image.affine, expected, atol=1e-5)
    np.testing.assert_allclose(image.header.get_zooms()[:3], (0.8, 0.7, 2.5), atol=1e-5)
    # slice d of the volume is what slice d (in position order) gives alone with seed + d
    hu = nodule_volume(5, 40)
    alone = per_slice_masks(server, Window(-600.0, 1500.0).apply(np.round(hu)))  # (D, k, H, W)
    np.testing.assert_array_equal(np.asarray(image.dataobj).transpose(2, 3, 1, 0), alone)
    # the same series as a zip
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as archive:
        for i, data in enumerate(shuffled):
            archive.writestr(f"series/IM{i}", data)
        archive.writestr("DICOMDIR", b"not an image")
    zipped = post(server, [buf.getvalue()], format="nifti")
    assert zipped.status_code == 200, zipped.text
    np.testing.assert_array_equal(np.asarray(read_nifti(zipped.content).dataobj), np.asarray(image.dataobj))


def test_dicom_seg_references_the_source_and_reads_back_with_the_samples(server):
    import highdicom as hd

    files = ct_series(depth=3, size=32)
    sources = [pydicom.dcmread(io.BytesIO(f)) for f in files]
    r = post(server, files, format="dicom-seg")
    assert r.status_code == 200, r.text
    archive = zipfile.ZipFile(io.BytesIO(r.content))
    assert sorted(archive.namelist()) == ["mean.dcm", "samples.dcm"]
    samples = hd.seg.segread(io.BytesIO(archive.read("samples.dcm")))
    mean = hd.seg.segread(io.BytesIO(archive.read("mean.dcm")))
    for seg in (samples, mean):
        for key, value in PATIENT.items():
            assert str(seg.get(key)) == value
        assert seg.StudyInstanceUID == STUDY_UID and seg.FrameOfReferenceUID == FRAME_OF_REFERENCE
        assert seg.SeriesInstanceUID != sources[0].SeriesInstanceUID  # a new series in the same study
        referenced = {uid for _, _, uid in seg.get_source_image_uids()}
        assert referenced == {s.SOPInstanceUID for s in sources}
    assert samples.SegmentationType == "BINARY" and samples.number_of_segments == K + 3
    labels = [samples.get_segment_description(i).SegmentLabel for i in range(1, K + 4)]
    assert labels[:K] == [f"sample {i}: nodule" for i in range(1, K + 1)] and labels[-1] == "nodule in >= 90% of samples"
    assert mean.SegmentationType == "FRACTIONAL" and mean.number_of_segments == 1
    # pixel content: the binary segments are the samples, the fractional one their mean
    nifti = np.asarray(read_nifti(post(server, files, format="nifti").content).dataobj)  # (W, H, D, k)
    order = [s.SOPInstanceUID for s in sorted(sources, key=lambda s: float(s.ImagePositionPatient[2]))]
    binary = samples.get_pixels_by_source_instance(order, combine_segments=False).astype(np.uint8)  # (D, H, W, S)
    np.testing.assert_array_equal(binary[..., :K], nifti.transpose(2, 1, 0, 3))
    fractional = mean.get_pixels_by_source_instance(order, combine_segments=False, rescale_fractional=True)[..., 0]
    np.testing.assert_allclose(fractional, nifti.transpose(2, 1, 0, 3).mean(-1), atol=1 / 255 + 1e-6)
    np.testing.assert_array_equal(binary[..., K + 1], nifti.transpose(2, 1, 0, 3).mean(-1) >= 0.5 - 1e-6)


def test_a_nifti_volume_in_any_orientation_comes_back_on_its_own_grid(server):
    hu = nodule_volume(6, 32)  # (D, H, W) in display order: rows anterior -> posterior, columns right -> left
    ras = hu.transpose(2, 1, 0)[::-1, ::-1, :]  # (x: R, y: A, z: S)
    # stored as (y, z, x) with y flipped (P -> A reversed), an oblique-free but scrambled layout, with an offset
    stored = ras.transpose(1, 2, 0)[::-1]
    affine = np.zeros((4, 4))
    affine[0, 2], affine[1, 0], affine[2, 1], affine[3, 3] = 0.9, -0.8, 2.0, 1.0
    affine[:3, 3] = (5.0, 6.0, 7.0)
    data = nifti_bytes(stored.astype(np.float32), affine)
    r = post(server, [data], format="nifti")
    assert r.status_code == 200, r.text
    image = read_nifti(r.content)
    np.testing.assert_allclose(image.affine, affine, atol=1e-6)
    assert image.shape == (*stored.shape, K)
    # the masks follow the voxels: bring both back to display order the same way and compare with slices sent alone
    out_ras = np.asarray(nib.as_closest_canonical(image).dataobj)  # (x, y, z, k) RAS
    display = out_ras[::-1, ::-1].transpose(2, 3, 1, 0)  # (D, k, H, W)
    lo, hi = hu.min(), hu.max()
    alone = per_slice_masks(server, (hu - lo) / (hi - lo))  # no window declared: the volume's range
    np.testing.assert_array_equal(display, alone)
    assert np.isclose(Window.spanning(hu).center, (lo + hi) / 2)


def test_uncertainty_as_nifti_volumes_and_a_2d_nifti(server):
    hu = nodule_volume(1, 32)[0]
    data = nifti_bytes(hu.T[::-1, ::-1].astype(np.int16), np.diag([-0.5, -0.5, 1.0, 1.0]), gz=False)
    r = post(server, [data], route="uncertainty", format="nifti")
    assert r.status_code == 200, r.text
    archive = zipfile.ZipFile(io.BytesIO(r.content))
    names = set(archive.namelist())
    assert names == {"probabilities.nii.gz", "aleatoric_entropy.nii.gz", "sample_entropy.nii.gz", "mutual_information.nii.gz",
                     "sample_variance.nii.gz", "mean.nii.gz"}
    for name in names:
        volume = read_nifti(archive.read(name))
        assert volume.get_data_dtype() == np.float32 and volume.shape[:3] == (32, 32, 1)
        np.testing.assert_allclose(volume.affine, np.diag([-0.5, -0.5, 1.0, 1.0]))
    assert read_nifti(archive.read("probabilities.nii.gz")).shape == (32, 32, 1, 2)
    mean = np.asarray(read_nifti(archive.read("mean.nii.gz")).dataobj)
    assert mean.min() >= 0 and mean.max() <= 1 and np.all(np.isin(np.round(mean * K), np.arange(K + 1)))
    # a 2-D NIfTI is one image: JSON works as for a PNG
    assert post(server, [data]).status_code == 200


def test_formats_that_do_not_fit_the_input_are_refused_with_what_would(server):
    volume = nifti_bytes(nodule_volume(4, 32).transpose(2, 1, 0).astype(np.float32), np.eye(4))  # (x, y, z): 4 axial slices
    r = post(server, [volume])  # JSON has no slice axis
    assert r.status_code == 422 and "format=nifti" in r.json()["detail"]
    r = post(server, [png(np.zeros((32, 32), np.uint8))], format="dicom-seg")
    assert r.status_code == 422 and "DICOM input" in r.json()["detail"]
    r = post(server, [png(np.zeros((32, 32), np.uint8))], route="uncertainty", format="dicom-seg")
    assert r.status_code == 422 and "nifti" in r.json()["detail"]  # not one of its formats
    r = httpx.post(f"{server.url}/v1/models/tiny/uncertainty", files={"image": ("x", png(np.zeros((32, 32), np.uint8)))},
                   headers={"Accept": "application/dicom"}, timeout=30)
    assert r.status_code == 406
    r = httpx.post(f"{server.url}/v1/models/tiny/samples", files={"image": ("x", volume)}, params={"k": K},
                   headers={"Accept": "application/x-nifti"}, timeout=30)
    assert r.status_code == 200 and r.headers["content-type"] == "application/x-nifti"
    npz = post(server, [volume], format="npz")
    arrays = np.load(io.BytesIO(npz.content))
    assert arrays["masks"].shape == (K, 4, 32, 32) and arrays["probabilities"].shape == (2, 4, 32, 32)


def _nifti_header(dims: tuple[int, ...], datatype: int = 16, bitpix: int = 32) -> bytes:
    header = nib.Nifti1Header()
    raw = bytearray(header.binaryblock)
    raw[40:56] = struct.pack("<8h", *dims, *([1] * (8 - len(dims))))  # dim[0] is the number of dimensions
    raw[70:74] = struct.pack("<hh", datatype, bitpix)
    return bytes(raw) + b"\0" * 4


def bad_inputs() -> dict[str, tuple[list[bytes], int]]:
    hu = nodule_volume(1, 32)[0]
    truncated = ct_slice(hu, 0)[:-500]
    two_series = [ct_slice(hu, 0), ct_slice(hu, 1, series_uid="1.2.826.0.1.3680043.8.498.9")]
    rgb = nifti_bytes(np.zeros((8, 8, 2, 3), np.uint8), np.eye(4))
    ones = np.ones((2, 2, 2, 2, 2), np.float32)
    # a header that declares 64 x 64 x 32 float32 slices (past the volume limit at k = 3) and holds no voxels:
    # refused from its first 540 inflated bytes
    declared_big = gzip.compress(_nifti_header((3, 64, 64, 32)))
    return {
        "dicom without pixel data": ([ct_slice(hu, 0, pixel_data=False)], 400),
        "truncated dicom": ([truncated], 400),
        "two series in one request": (two_series, 422),
        "5-D nifti": ([nifti_bytes(ones, np.eye(4))], 422),
        "4-D nifti with 3 volumes": ([rgb], 422),
        "complex nifti": ([nifti_bytes(np.zeros((8, 8, 2), np.complex64), np.eye(4))], 422),
        "absurd nifti size": ([_nifti_header((3, 30000, 30000, 2))], 413),
        "nifti declaring a volume past the limit": ([declared_big], 413),
        "nifti header only": ([_nifti_header((3, 16, 16, 2))], 400),
        "nan nifti": ([nifti_bytes(np.full((8, 8, 2), np.nan, np.float32), np.eye(4))], 422),
        "not a zip of dicom": ([zip_of({"a.txt": b"hello"})], 400),
        "a series of PNGs": ([png(np.zeros((8, 8), np.uint8))] * 2, 415),
    }


def zip_of(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return buf.getvalue()


@pytest.mark.parametrize("case", sorted(bad_inputs()))
def test_broken_dicom_and_nifti_get_a_clear_4xx(server, case):
    files, status = bad_inputs()[case]
    r = post(server, files, format="nifti")
    assert r.status_code == status, (case, r.status_code, r.text)
    body = r.json()
    assert set(body) == {"error", "detail"} and "Traceback" not in body["detail"]


def test_a_multi_frame_dicom_is_refused_as_unsupported(server):
    ds = pydicom.dcmread(io.BytesIO(ct_slice(nodule_volume(1, 16)[0], 0)))
    ds.NumberOfFrames = 2
    buf = io.BytesIO()
    ds.save_as(buf)
    r = post(server, [buf.getvalue()])
    assert r.status_code == 415 and "multi-frame" in r.json()["detail"]


def test_a_volume_past_its_cost_limit_is_refused_before_it_is_queued(server):
    big = nifti_bytes(np.zeros((64, 64, 20), np.float32), np.eye(4))  # 64 x 64 x 20 x max(k, 8) > the limit, 64 x 64 x 16 x 4
    r = post(server, [big], k=4)
    assert r.status_code == 413 and "volume limit" in r.json()["detail"]
    # k = 1 does not make a volume cheap: its answer still holds ~8 float maps per voxel
    ten = nifti_bytes(np.zeros((64, 64, 10), np.float32), np.eye(4))  # 64 x 64 x 10 x 8 > 64 x 64 x 16 x 4
    assert post(server, [ten], k=1, route="uncertainty", format="nifti").status_code == 413
    assert post(server, [nifti_bytes(np.zeros((64, 64, 8), np.float32), np.eye(4))], k=1, route="uncertainty", format="nifti").status_code == 200
    series = ct_series(depth=20, size=64)  # the same cost as a DICOM series: refused from the headers
    r = post(server, series, k=4, format="nifti")
    assert r.status_code == 413 and "volume limit" in r.json()["detail"]


def test_a_gzip_bomb_inflates_no_further_than_its_header_declares(server):
    """48 MB of zeros (47 kB gzipped) after a 16 x 16 x 2 header: only the declared voxels are inflated."""
    small = np.random.default_rng(0).random((16, 16, 2)).astype(np.float32)
    plain = nifti_bytes(small, np.eye(4), gz=False)
    bomb = gzip.compress(plain + b"\0" * (48 << 20), compresslevel=9)
    assert len(bomb) < 100_000
    r = post(server, [bomb], format="nifti")
    assert r.status_code == 200, r.text
    np.testing.assert_array_equal(read_nifti(r.content).dataobj, read_nifti(post(server, [gzip.compress(plain)], format="nifti").content).dataobj)
