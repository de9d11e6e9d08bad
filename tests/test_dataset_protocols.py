"""The literature's data sets read from their published on-disk formats, on tiny fixtures written
in those formats: LIDC v2 (Kohl et al.'s PNG crops), LIDC v1 (the PHiSeg/SSN pickle) and Cityscapes
(leftImg8bit + gtFine labelIds) with injected ambiguity."""

from __future__ import annotations

import builtins
import collections
import os
import pickle
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from training.data import DatasetError, open_dataset
from training.data.cityscapes import CLASSES as CS_CLASSES
from training.data.cityscapes import FLIP_PROBABILITIES, FLIP_TABLE, TWINS, Cityscapes
from training.data.lidc_v1 import LidcV1, load_pickle, safe_load
from training.data.lidc_v2 import LidcV2

# ---------------------------------------------------------------- LIDC v2: PNG crops

MARK = (26 + 5, 26 + 7)  # inside the 180 -> 128 centre crop: lands at (5, 7)
MASK_PIXEL = (100, 60)  # lands at (74, 34)


def write_v2_crop(root: Path, split: str, patient: str, stem: str, *, size: int = 180, grader_ids=(0, 1, 2, 3)) -> None:
    """One crop as the release stores it: an 8-bit grey image and one 0/255 PNG per grader."""
    image = np.full((size, size), 40, np.uint8)
    image[0, 0] = 200  # outside the crop: must not survive it
    image[MARK] = 255
    (root / split / "images" / patient).mkdir(parents=True, exist_ok=True)
    (root / split / "gt" / patient).mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(root / split / "images" / patient / f"{stem}.png")
    masks = [np.zeros((size, size), np.uint8) for _ in grader_ids]
    masks[0][80:100, 80:100] = 255  # the usual 0/255 mask
    # masks[1] stays empty: a grader who marked nothing
    masks[2][MASK_PIXEL] = 255
    masks[3][80:90, 80:90] = 1  # a 0/1 mask reads the same
    for grader, mask in zip(grader_ids, masks, strict=True):
        Image.fromarray(mask).save(root / split / "gt" / patient / f"{stem}_l{grader}.png")


@pytest.fixture
def v2_root(tmp_path):
    layout = {"train": {"LIDC-IDRI-0001": 2, "LIDC-IDRI-0002": 1}, "val": {"LIDC-IDRI-0003": 1}, "test": {"LIDC-IDRI-0004": 2}}
    for split, patients in layout.items():
        for patient, crops in patients.items():
            for c in range(crops):
                write_v2_crop(tmp_path, split, patient, f"z-{105.0 + 2 * c}_c0")
    return tmp_path


def test_lidc_v2_reads_the_release_layout(v2_root):
    ds = open_dataset(f"lidc-v2:{v2_root}", "train")
    assert isinstance(ds, LidcV2)
    assert (ds.classes, ds.in_channels, len(ds)) == (("background", "nodule"), 1, 3)
    assert ds.description == {"source": "lidc-v2", "root": str(v2_root), "split": "train", "cases": 3, "patients": 2, "annotators": 4}
    case = ds[0]
    assert case.case_id == "LIDC-IDRI-0001_z-105.0_c0" and case.truth is None
    assert case.image.shape == (128, 128, 1) and case.image.dtype == np.uint8
    assert case.labels.shape == (4, 128, 128) and case.labels.dtype == np.uint8
    # the dataset's own splits: each reads its folder
    assert [len(open_dataset(f"lidc-v2:{v2_root}", s)) for s in ("val", "test")] == [1, 2]
    assert open_dataset(f"lidc-v2:{v2_root}", "test")[1].case_id == "LIDC-IDRI-0004_z-107.0_c0"


def test_lidc_v2_centre_crops_180_to_128_binarises_and_keeps_empty_graders(v2_root):
    case = LidcV2(v2_root, "val")[0]
    image = case.image[:, :, 0]
    assert image[5, 7] == 255 and (image == 255).sum() == 1  # the marker moved by (26, 26)
    assert 200 not in image  # the corner pixel is outside the crop
    assert set(np.unique(case.labels)) == {0, 1}
    assert case.labels[0].sum() == 20 * 20 and case.labels[0][80 - 26, 80 - 26] == 1
    assert case.labels[1].sum() == 0  # empty grader mask kept, as the fourth annotator slot
    assert case.labels[2][MASK_PIXEL[0] - 26, MASK_PIXEL[1] - 26] == 1 and case.labels[2].sum() == 1
    assert case.labels[3].sum() == 10 * 10  # 0/1 masks binarise like 0/255 ones


def test_lidc_v2_accepts_the_readme_1_based_grader_ids(tmp_path):
    write_v2_crop(tmp_path, "train", "LIDC-IDRI-0007", "z-1.0_c0", grader_ids=(1, 2, 3, 4))
    case = LidcV2(tmp_path, "train")[0]
    assert case.labels.shape == (4, 128, 128) and case.labels[0].sum() == 400 and case.labels[1].sum() == 0


def test_lidc_v2_errors_name_the_file(v2_root):
    with pytest.raises(DatasetError, match="unknown split"):
        LidcV2(v2_root, "training")
    (v2_root / "val" / "gt" / "LIDC-IDRI-0003" / "z-105.0_c0_l2.png").unlink()
    with pytest.raises(DatasetError, match=r"z-105.0_c0_l2\.png: grader mask missing"):
        LidcV2(v2_root, "val")[0]
    gt = v2_root / "test" / "gt" / "LIDC-IDRI-0004" / "z-105.0_c0_l1.png"
    Image.fromarray(np.zeros((170, 180), np.uint8)).save(gt)
    with pytest.raises(DatasetError, match=r"z-105.0_c0_l1\.png: mask shape \(170, 180\) differs"):
        LidcV2(v2_root, "test")[0]
    (v2_root / "train" / "gt").rename(v2_root / "train" / "labels")
    with pytest.raises(DatasetError, match=r"train/gt: missing"):
        open_dataset(f"lidc-v2:{v2_root}", "train")
    with pytest.raises(DatasetError, match="expected lidc-v2:PATH"):
        open_dataset("lidc-v2:", "train")


def test_lidc_v2_refuses_crops_smaller_than_128(tmp_path):
    write_v2_crop(tmp_path, "train", "LIDC-IDRI-0001", "z-1.0_c0", size=120)
    with pytest.raises(DatasetError, match="smaller than the 128x128"):
        LidcV2(tmp_path, "train")[0]


# ---------------------------------------------------------------- LIDC v1: the pickle


def v1_data(patients: int = 20, slices: int = 3, size: int = 128) -> dict[str, dict]:
    """The real structure: {slice_name: {'image': float32 [0, 1], 'masks': [4 x uint8], 'series_uid': str}}."""
    rng = np.random.default_rng(0)
    data = {}
    for p in range(patients):
        uid = f"1.3.6.1.4.1.14519.5.2.1.6279.6001.{100000 + p * 7919}"
        for s in range(slices):
            masks = [np.zeros((size, size), np.uint8) for _ in range(4)]
            masks[0][40:60, 40:60] = 1
            masks[2][50:70, 50:70] = 255
            masks[3][45:55, 45:55] = 1  # masks[1] empty: kept
            image = rng.random((size, size), dtype=np.float32)
            image[0, 0], image[0, 1] = 0.0, 1.0
            data[f"LIDC-IDRI-{p:04d}_slice{s}"] = {"image": image, "masks": masks, "series_uid": uid}
    return data


@pytest.fixture(scope="module")
def v1_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("lidc_v1") / "data_lidc.pickle"
    with open(path, "wb") as f:
        pickle.dump(v1_data(), f)
    return path


def test_lidc_v1_reads_the_pickle(v1_file):
    ds = open_dataset(f"lidc-v1:{v1_file}", "train")
    assert isinstance(ds, LidcV1) and (ds.classes, ds.in_channels) == (("background", "nodule"), 1)
    assert ds.description == {"source": "lidc-v1", "root": str(v1_file), "split": "train", "cases": 36, "patients": 12}
    case = ds[0]
    source = v1_data()[case.case_id]
    assert case.image.shape == (128, 128, 1) and case.image.dtype == np.uint16
    assert np.array_equal(case.image[:, :, 0], np.rint(source["image"] * 65535).astype(np.uint16))
    assert case.image[0, 0, 0] == 0 and case.image[0, 1, 0] == 65535
    assert case.labels.shape == (4, 128, 128) and case.labels.dtype == np.uint8
    assert set(np.unique(case.labels)) == {0, 1}
    assert case.labels[1].sum() == 0 and case.labels[2].sum() == 400  # empty kept; 255 -> 1


def test_lidc_v1_splits_by_patient_60_20_20_deterministically(v1_file, tmp_path):
    splits = {s: LidcV1(v1_file, s) for s in ("train", "val", "test")}
    patients = {s: ds.patients for s, ds in splits.items()}
    assert [len(patients[s]) for s in ("train", "val", "test")] == [12, 4, 4]
    assert not (patients["train"] & patients["val"] or patients["train"] & patients["test"] or patients["val"] & patients["test"])
    data = v1_data()
    for split, ds in splits.items():  # every slice of a patient goes where its patient goes
        assert {data[ds[i].case_id]["series_uid"] for i in range(len(ds))} == patients[split]
    assert sum(len(ds) for ds in splits.values()) == len(data)
    # the split depends on the uids only, not on the file's key order
    reordered = tmp_path / "reordered.pickle"
    with open(reordered, "wb") as f:
        pickle.dump(dict(reversed(list(data.items()))), f)
    assert LidcV1(reordered, "val").patients == patients["val"]


def test_lidc_v1_reads_the_file_once_per_process(v1_file, tmp_path):
    assert load_pickle(v1_file) is load_pickle(v1_file)
    assert LidcV1(v1_file, "train")._data is LidcV1(v1_file, "test")._data
    path = tmp_path / "data_lidc.pickle"
    with open(path, "wb") as f:
        pickle.dump(v1_data(patients=5, slices=1), f)
    first = load_pickle(path)
    with open(path, "wb") as f:  # rewritten: read again
        pickle.dump(v1_data(patients=6, slices=1), f)
    assert len(load_pickle(path)) == 6 and len(first) == 5


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_lidc_v1_reads_every_pickle_protocol(tmp_path, protocol):
    path = tmp_path / "data_lidc.pickle"
    data = v1_data(patients=5, slices=1, size=16)
    with open(path, "wb") as f:
        pickle.dump(data, f, protocol=protocol)
    loaded = safe_load(path)
    key = next(iter(data))
    assert np.array_equal(loaded[key]["image"], data[key]["image"]) and loaded[key]["image"].dtype == np.float32
    assert np.array_equal(loaded[key]["masks"][2], data[key]["masks"][2]) and loaded[key]["series_uid"] == data[key]["series_uid"]


class WritesAFile:
    """Unpickling this calls ``exec``, which would create ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (builtins.exec, (f"open({str(self.marker)!r}, 'w').write('ran')",))


class RunsAShell:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("payload", [WritesAFile, RunsAShell], ids=["builtins.exec", "os.system"])
def test_lidc_v1_refuses_a_malicious_pickle_and_runs_nothing(tmp_path, payload):
    marker = tmp_path / "pwned"
    # the attack hides inside an otherwise valid file, where a mask should be
    data = v1_data(patients=1, slices=1, size=8)
    next(iter(data.values()))["masks"][0] = payload(marker)
    path = tmp_path / "data_lidc.pickle"
    with open(path, "wb") as f:
        pickle.dump(data, f)
    pickle.loads(pickle.dumps(payload(tmp_path / "control")))
    assert (tmp_path / "control").exists()  # the payload does work when unpickled normally...
    with pytest.raises(DatasetError, match=r"data_lidc\.pickle: pickle refers to (builtins\.exec|posix\.system|os\.system).*refused"):
        LidcV1(path, "train")
    assert not marker.exists()  # ...and nothing ran here


def test_lidc_v1_refuses_any_other_class(tmp_path):
    path = tmp_path / "data_lidc.pickle"
    with open(path, "wb") as f:
        pickle.dump(collections.OrderedDict(a=1), f)
    with pytest.raises(DatasetError, match=r"collections\.OrderedDict.*refused"):
        safe_load(path)
    with open(path, "wb") as f:
        pickle.dump({"s": {"image": np.array([object()], dtype=object), "masks": [], "series_uid": "u"}}, f)
    with pytest.raises(DatasetError, match=r"builtins\.object.*refused"):
        safe_load(path)


def test_lidc_v1_errors_name_the_file(tmp_path):
    with pytest.raises(DatasetError, match="missing"):
        open_dataset(f"lidc-v1:{tmp_path / 'nothing.pickle'}", "train")
    path = tmp_path / "data_lidc.pickle"
    path.write_bytes(b"not a pickle")
    with pytest.raises(DatasetError, match="not a readable pickle"):
        LidcV1(path, "train")
    with open(path, "wb") as f:
        pickle.dump({"slice0": {"image": np.zeros((8, 8), np.float32), "masks": []}}, f)
    with pytest.raises(DatasetError, match=r"slice 'slice0' must be a dict with 'image', 'masks' and 'series_uid'"):
        LidcV1(path, "train")
    data = v1_data(patients=5, slices=1, size=8)
    for value in data.values():
        value["image"] = value["image"] * 255  # [0, 255]: not the format
    with open(path, "wb") as f:
        pickle.dump(data, f)
    with pytest.raises(DatasetError, match=r"must lie in \[0, 1\]"):
        LidcV1(path, "train")[0]


# ---------------------------------------------------------------- Cityscapes with injected ambiguity

# labelIds in 4x4 blocks, so a x0.25 nearest downscale must return exactly this grid
GRID = np.array(
    [
        [7, 7, 7, 7, 8, 8, 8, 8, 11, 11, 11, 11, 23, 23, 23, 23],
        [7, 7, 7, 7, 8, 8, 8, 8, 11, 11, 11, 11, 23, 23, 23, 23],
        [24, 24, 26, 26, 21, 21, 33, 33, 0, 1, 9, 40, 3, 25, 31, 17],
        [24, 24, 26, 26, 21, 21, 33, 33, 0, 1, 9, 40, 3, 25, 31, 17],
        [7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7],
        [7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7],
        [22, 22, 22, 22, 19, 19, 20, 20, 12, 12, 13, 13, 27, 28, 32, 5],
        [6, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6],
    ],
    dtype=np.uint8,
)
# cityscapesScripts' trainId + 1 for every non-void id in GRID; the void ids (0 unlabeled, 1 ego
# vehicle, 3 out of roi, 5 dynamic, 6 ground, 9 parking) and 40, which the table lacks, map to 0
EXPECTED = {7: 1, 8: 2, 11: 3, 12: 4, 13: 5, 17: 6, 19: 7, 20: 8, 21: 9, 22: 10, 23: 11, 24: 12, 25: 13, 26: 14, 27: 15, 28: 16, 31: 17, 32: 18, 33: 19}
VOID_IDS = (0, 1, 3, 5, 6, 9, 40)


def write_cityscapes_frame(root: Path, split: str, city: str, frame: str, label_ids: np.ndarray, extra: tuple[int, int] = (0, 0)) -> None:
    """One frame as the official packages hold it; ``extra`` pads the full-size files so their size
    is not a multiple of 4."""
    full = np.kron(label_ids, np.ones((4, 4), np.uint8))
    full = np.pad(full, ((0, extra[0]), (0, extra[1])), mode="edge")
    wide = full.astype(np.int64)
    rgb = np.stack([wide * 7 % 256, wide * 3 % 256, np.full_like(wide, 90)], axis=-1).astype(np.uint8)
    prefix = f"{city}_{frame}"
    (root / "leftImg8bit" / split / city).mkdir(parents=True, exist_ok=True)
    (root / "gtFine" / split / city).mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(root / "leftImg8bit" / split / city / f"{prefix}_leftImg8bit.png")
    Image.fromarray(full).save(root / "gtFine" / split / city / f"{prefix}_gtFine_labelIds.png")
    Image.fromarray(full).save(root / "gtFine" / split / city / f"{prefix}_gtFine_color.png")  # ignored


@pytest.fixture
def cs_root(tmp_path):
    no_car = np.where(GRID == 26, 11, GRID).astype(np.uint8)
    write_cityscapes_frame(tmp_path, "train", "aachen", "000000_000019", GRID)
    write_cityscapes_frame(tmp_path, "train", "aachen", "000001_000019", no_car, extra=(2, 3))
    write_cityscapes_frame(tmp_path, "train", "ulm", "000000_000019", GRID)  # held out: our val
    write_cityscapes_frame(tmp_path, "val", "frankfurt", "000000_000294", GRID)  # official val: our test
    (tmp_path / "leftImg8bit" / "test" / "berlin").mkdir(parents=True)  # official test: never read
    return tmp_path


def test_cityscapes_class_list_and_flip_table():
    assert len(CS_CLASSES) == 25 and CS_CLASSES[0] == "void" and CS_CLASSES[1] == "road" and CS_CLASSES[19] == "bicycle"
    assert CS_CLASSES[20:] == ("sidewalk_2", "person_2", "car_2", "vegetation_2", "road_2")
    assert FLIP_PROBABILITIES == {"sidewalk": 8 / 17, "person": 7 / 17, "car": 6 / 17, "vegetation": 5 / 17, "road": 4 / 17}
    assert TWINS["vegetation"] == "vegetation_2"
    assert {(CS_CLASSES[c], CS_CLASSES[t], p) for c, t, p in FLIP_TABLE} == {(k, TWINS[k], p) for k, p in FLIP_PROBABILITIES.items()}


def test_cityscapes_maps_label_ids_to_train_ids_and_downscales_by_4(cs_root):
    ds = open_dataset(f"cityscapes:{cs_root}", "train")
    assert isinstance(ds, Cityscapes) and (ds.in_channels, ds.classes, len(ds)) == (3, CS_CLASSES, 2)
    assert ds.description["official_split"] == "train" and ds.description["cases"] == 2 and ds.description["root"] == str(cs_root)
    case = ds[0]
    assert case.case_id == "aachen_000000_000019"
    assert case.image.shape == (8, 16, 3) and case.image.dtype == np.uint8  # (H // 4, W // 4) of the 32x64 file
    assert case.labels.shape == (4, 8, 16) and case.labels.dtype == np.uint8
    expected = np.vectorize(lambda i: EXPECTED.get(int(i), 0), otypes=[np.uint8])(GRID)
    assert np.array_equal(case.truth.base, expected)
    for label_id in VOID_IDS:
        assert (case.truth.base[GRID == label_id] == 0).all(), label_id
    assert case.truth.base[0, 0] == 1 and case.truth.base[0, 4] == 2 and case.truth.base[2, 6] == 19  # road, sidewalk, bicycle
    image_file = cs_root / "leftImg8bit" / "train" / "aachen" / "aachen_000000_000019_leftImg8bit.png"
    assert np.array_equal(case.image, np.asarray(Image.open(image_file).convert("RGB").resize((16, 8), Image.Resampling.BILINEAR)))
    odd = ds[1]  # 34x67 on disk -> 8x16
    assert odd.image.shape == (8, 16, 3) and odd.labels.shape == (4, 8, 16)


def test_cityscapes_events_are_the_flippable_classes_present(cs_root):
    truth = Cityscapes(cs_root, "train")[0].truth
    by_kind = {e.kind: e for e in truth.events}
    assert set(by_kind) == set(FLIP_PROBABILITIES)
    for kind, event in by_kind.items():
        index, twin = CS_CLASSES.index(kind), CS_CLASSES.index(TWINS[kind])
        assert np.array_equal(event.region, truth.base == index) and event.region.any()
        assert (event.probability, event.on_label, event.off_label) == (FLIP_PROBABILITIES[kind], twin, index)
    marginals = truth.marginals(len(CS_CLASSES))
    assert np.allclose(marginals.sum(0), 1.0) and np.isclose(marginals[CS_CLASSES.index("road_2"), 0, 0], 4 / 17)
    no_car = Cityscapes(cs_root, "train")[1].truth
    assert {e.kind for e in no_car.events} == set(FLIP_PROBABILITIES) - {"car"}


def test_cityscapes_annotators_follow_the_truth_and_are_deterministic(cs_root):
    case = Cityscapes(cs_root, "train")[0]
    again = open_dataset(f"cityscapes:{cs_root}", "train")[0]
    assert np.array_equal(case.labels, again.labels)
    rng = np.random.default_rng([zlib.crc32(b"cityscapes"), 0, 0])
    assert np.array_equal(case.labels, case.truth.sample(rng, 4))
    outside = ~np.any([e.region for e in case.truth.events], axis=0)
    assert (case.labels[:, outside] == case.truth.base[outside]).all()  # void stays 0, others fixed
    for event in case.truth.events:  # an object flips all together, to its twin or not at all
        values = case.labels[:, event.region]
        assert (values == values[:, :1]).all() and set(values[:, 0]) <= {event.on_label, event.off_label}


def test_cityscapes_splits_hold_out_cities_and_test_on_official_val(cs_root):
    train, val, test = (Cityscapes(cs_root, s) for s in ("train", "val", "test"))
    assert [train[i].case_id.split("_")[0] for i in range(len(train))] == ["aachen", "aachen"]
    assert [val[i].case_id for i in range(len(val))] == ["ulm_000000_000019"]
    assert [test[i].case_id for i in range(len(test))] == ["frankfurt_000000_000294"]
    assert test.description["official_split"] == "val" and val.description["official_split"] == "train"
    for split_index, ds in ((1, val), (2, test)):  # the split is part of the annotators' seed
        rng = np.random.default_rng([zlib.crc32(b"cityscapes"), split_index, 0])
        assert np.array_equal(ds[0].labels, ds[0].truth.sample(rng, 4))


def test_cityscapes_errors_name_the_file(cs_root, tmp_path):
    label = cs_root / "gtFine" / "train" / "aachen" / "aachen_000000_000019_gtFine_labelIds.png"
    Image.fromarray(np.zeros((30, 64), np.uint8)).save(label)
    with pytest.raises(DatasetError, match=r"aachen_000000_000019_gtFine_labelIds\.png: size \(64, 30\) differs"):
        Cityscapes(cs_root, "train")[0]
    label.unlink()
    with pytest.raises(DatasetError, match=r"aachen_000000_000019_gtFine_labelIds\.png: labelIds map missing"):
        Cityscapes(cs_root, "train")[0]
    write_cityscapes_frame(tmp_path / "no_val", "train", "aachen", "000000_000019", GRID)
    with pytest.raises(DatasetError, match="darmstadt, monchengladbach, ulm"):
        Cityscapes(tmp_path / "no_val", "val")
    with pytest.raises(DatasetError, match=r"leftImg8bit/val: missing"):
        open_dataset(f"cityscapes:{tmp_path / 'no_val'}", "test")


def test_cityscapes_is_judged_against_its_32_modes_with_a_per_class_flip_table(cs_root):
    # the per-kind table is the protocol's per-class flip table: each class against its injected probability
    from tests.service_fixtures import write_tiny_model
    from training.baselines import baseline
    from training.checkpoint import load_model
    from training.evaluate import evaluate

    write_tiny_model(cs_root / "models", "cs", channels=3, classes=len(CS_CLASSES))
    dataset = Cityscapes(cs_root, "train")
    assert dataset[0].truth.modes()[0].shape[0] == 32  # five flippable classes present
    result = evaluate(baseline(load_model(cs_root / "models" / "cs").networks, "deterministic"), dataset, n_samples=4)
    assert "ged_truth_4" in result.summary and "oracle_ged_truth_4" in result.summary
    # a deterministic sampler has no spread to lose: its certain pixels set to the truth only move it closer
    assert result.summary["ged_truth_events_4"] <= result.summary["ged_truth_4"] + 1e-9
    assert set(result.per_kind) == set(FLIP_PROBABILITIES)
    for kind, row in result.per_kind.items():
        assert row["true"] == pytest.approx(FLIP_PROBABILITIES[kind])
