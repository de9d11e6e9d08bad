"""Probability iso-contours (``service.codecs.contours``) and ``POST /v1/models/{name}/contours``."""

from __future__ import annotations

import math

import httpx
import numpy as np
import pytest

from service.codecs.contours import LEVELS, PlaneGeometry, display_image, iso_contours, to_patient
from service.config import Settings
from service.errors import InvalidImage
from tests.embedded import EmbeddedServer
from tests.service_fixtures import b64, decode_png, grey, npy, png


def distances(polygon: np.ndarray, cx: float, cy: float) -> np.ndarray:
    return np.hypot(polygon[:, 0] - cx, polygon[:, 1] - cy)


def area(polygon: np.ndarray) -> float:
    x, y = polygon[:, 0], polygon[:, 1]
    return 0.5 * abs(float(x @ np.roll(y, -1) - y @ np.roll(x, -1)))


def inside(point: np.ndarray, polygon: np.ndarray) -> bool:
    """Even-odd rule: does a horizontal ray from the point cross the polygon's edges an odd number of times?"""
    x, y = point
    crossings = 0
    for (x0, y0), (x1, y1) in zip(polygon, np.roll(polygon, -1, axis=0), strict=True):
        if (y0 > y) != (y1 > y) and x < x0 + (y - y0) * (x1 - x0) / (y1 - y0):
            crossings += 1
    return crossings % 2 == 1


def radial(height: int, width: int, cx: float, cy: float) -> np.ndarray:
    yy, xx = np.mgrid[:height, :width]
    return np.hypot(xx - cx, yy - cy)


def test_a_disc_gives_one_contour_per_level_at_its_radius():
    d = radial(48, 56, 27.0, 22.0)
    binary = (d <= 10).astype(np.float32)
    for level, polygons in iso_contours(binary).items():
        assert len(polygons) == 1, level
        assert abs(distances(polygons[0], 27, 22).mean() - 10.0) < 0.5
    # a frequency falling linearly from 1 at radius 7 to 0 at radius 13: level l lies at 13 - 6 l
    ramp = np.clip((13 - d) / 6, 0, 1)
    for level, polygons in iso_contours(ramp).items():
        (polygon,) = polygons
        assert abs(distances(polygon, 27, 22).mean() - (13 - 6 * level)) < 0.05, level
        assert polygon.shape[1] == 2 and not np.array_equal(polygon[0], polygon[-1])  # closed implicitly


def test_levels_are_nested():
    # two blobs of different height: the 90% contour exists only inside the taller one
    frequency = 0.95 * np.exp(-(radial(64, 64, 20, 24) / 7) ** 2) + 0.6 * np.exp(-(radial(64, 64, 46, 40) / 6) ** 2)
    contours = iso_contours(frequency)
    assert [len(contours[level]) for level in LEVELS] == [2, 2, 1]
    for inner_level, outer_level in ((0.9, 0.5), (0.5, 0.1)):
        for inner in contours[inner_level]:
            assert any(all(inside(p, outer) for p in inner) for outer in contours[outer_level]), (inner_level, outer_level)
            assert any(area(inner) < area(outer) for outer in contours[outer_level])


def test_a_region_touching_the_edge_closes_inside_the_image():
    frequency = np.zeros((20, 30))
    frequency[:5, :6] = 1.0  # the top-left corner
    frequency[8:12, 29] = 1.0  # a strip on the right edge
    polygons = iso_contours(frequency, [0.5])[0.5]
    assert len(polygons) == 2
    for polygon in polygons:
        assert len(polygon) >= 3
        assert (polygon[:, 0] >= 0).all() and (polygon[:, 0] <= 29).all() and (polygon[:, 1] >= 0).all() and (polygon[:, 1] <= 19).all()
    corner = min(polygons, key=lambda p: p[:, 0].min())
    assert corner[:, 0].min() == 0 and corner[:, 1].min() == 0
    # the half-pixel margin beyond the edges is clipped off: 5.5 x 4.5 less the interior corner's cut
    assert abs(area(corner) - 5.5 * 4.5) < 0.2


def test_an_empty_or_low_constant_map_gives_no_polygons():
    assert iso_contours(np.zeros((16, 16))) == {level: [] for level in LEVELS}
    assert iso_contours(np.full((16, 16), 0.05)) == {level: [] for level in LEVELS}
    # where every sample agrees on the whole image, the region is the image itself: its border
    full = iso_contours(np.ones((10, 12)))
    for level in LEVELS:
        (polygon,) = full[level]
        assert (polygon.min(axis=0) == [0, 0]).all() and (polygon.max(axis=0) == [11, 9]).all()


def test_a_frequency_map_must_be_two_dimensional():
    with pytest.raises(ValueError, match=r"\(H, W\)"):
        iso_contours(np.zeros((2, 8, 8)))


def test_patient_coordinates_on_a_rotated_offset_plane():
    # a sagittal plane: columns run anterior -> posterior (+y), rows run head -> feet (-z)
    geometry = PlaneGeometry.from_dicom([-100.0, 20.0, 50.0], [0, 1, 0, 0, 0, -1], [2.0, 0.5])
    polygon = np.array([[0.0, 0.0], [4.0, 0.0], [4.0, 3.0]])
    assert to_patient(polygon, geometry) == [-100, 20, 50, -100, 22, 50, -100, 22, 44]
    # an axial plane turned 30 degrees about z: a step along x is (cos, sin, 0) * column spacing
    c, s = math.cos(math.radians(30)), math.sin(math.radians(30))
    turned = PlaneGeometry.from_dicom([10, -5, 7.5], [c, s, 0, -s, c, 0], [0.8, 0.6])
    points = np.reshape(to_patient(np.array([[1.0, 0.0], [0.0, 1.0], [2.0, 5.0]]), turned), (-1, 3))
    expected = np.array([[10 + 0.6 * c, -5 + 0.6 * s, 7.5], [10 - 0.8 * s, -5 + 0.8 * c, 7.5],
                         [10 + 1.2 * c - 4.0 * s, -5 + 1.2 * s + 4.0 * c, 7.5]])
    assert np.allclose(points, expected)


@pytest.mark.parametrize(("orientation", "spacing"), [
    ([1, 0, 0, 1, 0, 0], [1, 1]),  # parallel directions
    ([2, 0, 0, 0, 1, 0], [1, 1]),  # not unit
    ([1, 0, 0, 0, 1, 0], [0, 1]),  # no spacing
])
def test_a_degenerate_geometry_is_refused(orientation, spacing):
    with pytest.raises(InvalidImage):
        PlaneGeometry.from_dicom([0, 0, 0], orientation, spacing)


def test_display_image_scales_each_dtype_to_8_bits():
    assert display_image(np.full((2, 3, 1), 7, np.uint8)).tolist() == np.full((2, 3), 7).tolist()
    assert display_image(np.array([[[0], [65535], [32768]]], np.uint16)).tolist() == [[0, 255, 128]]
    assert display_image(np.array([[[0.0], [1.0], [1.5]]], np.float32)).tolist() == [[0, 255, 255]]
    rgb = np.arange(2 * 2 * 3, dtype=np.uint8).reshape(2, 2, 3)
    assert (display_image(rgb) == rgb).all()


# ---- the route -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(model_dir):
    with EmbeddedServer(Settings(model_dir=model_dir)) as srv:
        yield srv


def post(server, data: bytes, route: str = "contours", model: str = "tiny", **params) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/models/{model}/{route}", files={"image": ("x", data)}, params=params, timeout=30)


def test_contours_agree_with_the_samples_of_the_same_seed(server):
    image = grey(30, 44, seed=5)
    r = post(server, png(image), k=8, seed=3)
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["model"], body["version"], body["k"], body["seed"], body["height"], body["width"]) == ("tiny", "1", 8, 3, 30, 44)
    assert body["classes"] == ["background", "nodule"] and body["levels"] == list(LEVELS)
    assert set(body["contours"]) == set(body["mean"]) == {"nodule"}

    masks = np.stack([decode_png(m) for m in post(server, png(image), route="samples", k=8, seed=3).json()["masks"]])
    frequency = (masks == 1).mean(axis=0)
    mean = decode_png(body["mean"]["nodule"])
    assert mean.shape == (30, 44) and mean.dtype == np.uint8
    assert np.abs(mean.astype(int) - np.round(frequency * 255)).max() <= 1

    expected = iso_contours(frequency)
    assert [entry["level"] for entry in body["contours"]["nodule"]] == list(LEVELS)
    for entry in body["contours"]["nodule"]:
        got = entry["polygons"]
        assert len(got) == len(expected[entry["level"]])
        for polygon, want in zip(got, expected[entry["level"]], strict=True):
            assert np.allclose(polygon, want, atol=1e-3)
            assert all(0 <= x <= 43 and 0 <= y <= 29 for x, y in polygon)
    assert (decode_png(body["image"]) == image).all()  # 8-bit grey: shown as given


def test_contours_take_a_json_body_and_show_16_bit_and_float_inputs_in_8_bits(server):
    wide = np.linspace(0, 65535, 24 * 24).reshape(24, 24).astype(np.uint16)
    as_json = httpx.post(f"{server.url}/v1/models/tiny/contours", json={"image": b64(png(wide)), "k": 3, "seed": 9}, timeout=30)
    assert as_json.status_code == 200, as_json.text
    assert (as_json.json()["k"], as_json.json()["seed"]) == (3, 9)
    assert np.abs(decode_png(as_json.json()["image"]).astype(int) - np.round(wide / 65535 * 255)).max() <= 1

    floats = np.linspace(0, 1, 20 * 16, dtype=np.float32).reshape(20, 16)
    r = post(server, npy(floats), k=2, seed=1)
    assert r.status_code == 200, r.text
    assert np.abs(decode_png(r.json()["image"]).astype(int) - np.round(floats * 255)).max() <= 1


def test_contour_errors_are_the_services(server):
    missing = post(server, png(grey()), model="nope")
    assert missing.status_code == 404 and missing.json()["error"] == "model_not_found"
    bad_k = post(server, png(grey()), k=0)
    assert bad_k.status_code == 422 and bad_k.json()["error"] == "invalid_parameter"
    not_an_image = post(server, b"GIF89a....")
    assert not_an_image.status_code == 415 and set(not_an_image.json()) == {"error", "detail"}
    assert "/v1/models/{name}/contours" in httpx.get(f"{server.url}/openapi.json").json()["paths"]


def test_a_dicom_instance_comes_back_as_a_picture_a_browser_can_show(server):
    from tests.medical_fixtures import ct_series

    (instance,) = ct_series(depth=1, size=48)
    r = post(server, instance, k=2, seed=4)
    assert r.status_code == 200, r.text
    shown = decode_png(r.json()["image"])
    assert shown.shape == (48, 48) and shown.dtype == np.uint8
    # windowed as the model saw it: the soft-tissue sphere is brighter than the lung around it
    assert shown[19, 29] > shown[4, 4] + 100
    series = httpx.post(f"{server.url}/v1/models/tiny/contours", files=[("image", ("s", s)) for s in ct_series(depth=3, size=32)],
                        params={"k": 2}, timeout=30)
    assert series.status_code == 422 and "volume of 3 slices" in series.json()["detail"]
