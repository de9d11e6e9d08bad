import json

import numpy as np
import pytest
from PIL import Image

from training.data import DatasetError, open_dataset
from training.data.folder import write_case, write_classes
from training.data.synthetic import FLIP_CLASSES, HALO_KINDS, SyntheticDataset


def test_lidc_sample_reads_real_crops_with_four_graders(lidc_root):
    train = open_dataset("lidc-sample", "train")
    test = open_dataset("lidc-sample", "test")
    assert (len(train), len(test)) == (19, 9)
    case = test[0]
    assert case.image.shape == (128, 128, 1) and case.image.dtype == np.uint8
    assert case.labels.shape == (4, 128, 128)
    assert set(np.unique(case.labels)) <= {0, 1}
    # empty grader masks are valid and common in LIDC; some grader marks something somewhere
    assert any(open_dataset("lidc-sample", "test")[i].labels.any() for i in range(len(test)))


@pytest.mark.parametrize("generator", ["halo", "flips"])
def test_synthetic_is_reproducible_and_follows_its_truth(generator):
    ds = SyntheticDataset(generator, "test", 10)
    a, b = ds[3], ds[3]
    assert np.array_equal(a.image, b.image) and np.array_equal(a.labels, b.labels)
    assert not np.array_equal(ds[3].image, SyntheticDataset(generator, "train", 10)[3].image)
    case = ds[0]
    marg = case.truth.marginals(len(ds.classes))
    assert np.allclose(marg.sum(0), 1.0)
    # each annotator agrees with the truth: outside events it equals the base map
    outside = ~np.any([e.region for e in case.truth.events], axis=0)
    assert (case.labels[:, outside] == case.truth.base[outside]).all()


def test_event_frequencies_match_their_probabilities():
    rng = np.random.default_rng(0)
    case = next(c for c in SyntheticDataset("halo", "train", 20) if c.truth.events)
    event = case.truth.events[0]
    draws = case.truth.sample(rng, 4000)[:, event.region]
    assert (draws == draws[:, :1]).all()  # all pixels of an event together
    assert abs((draws[:, 0] == event.on_label).mean() - HALO_KINDS[event.kind]) < 0.03


def test_halo_crops_are_centred_on_their_lesion_and_every_kind_occurs():
    from scipy import ndimage

    seen = set()
    for case in SyntheticDataset("halo", "test", 40):
        cy, cx = ndimage.center_of_mass(case.truth.marginals(2)[1] > 0)
        assert abs(cy - 64) < 8 and abs(cx - 64) < 8, case.case_id  # LIDC crops are centred on the nodule
        seen |= {e.kind for e in case.truth.events} or {"solid"}
    assert seen == {"solid", *HALO_KINDS}


def test_synthetic_image_shapes():
    halo = SyntheticDataset("halo", "val", 2)[1]
    flips = SyntheticDataset("flips", "val", 2)[1]
    assert halo.image.shape == (128, 128, 1) and flips.image.shape == (64, 64, 3)
    assert flips.labels.max() < len(FLIP_CLASSES)


def test_folder_format_round_trip(tmp_path):
    source = SyntheticDataset("flips", "train", 3)
    write_classes(tmp_path, source.classes)
    for i in range(3):
        write_case(tmp_path / "train", source[i])
    (tmp_path / "train" / "notes.txt").write_text("ignored")
    (tmp_path / "README").write_text("ignored")
    ds = open_dataset(str(tmp_path), "train")
    assert ds.classes == source.classes and ds.in_channels == 3 and len(ds) == 3
    got = {ds[i].case_id: ds[i] for i in range(3)}
    assert np.array_equal(got[source[1].case_id].labels, source[1].labels)
    assert np.array_equal(got[source[1].case_id].image, source[1].image)


def test_folder_format_reads_16_bit_grey(tmp_path):
    write_classes(tmp_path, ("background", "lesion"))
    case_dir = tmp_path / "val" / "c1"
    case_dir.mkdir(parents=True)
    Image.fromarray(np.full((8, 8), 40000, np.uint16)).save(case_dir / "image.png")
    Image.fromarray(np.eye(8, dtype=np.uint8)).save(case_dir / "label_0.png")
    case = open_dataset(str(tmp_path), "val")[0]
    assert case.image.dtype == np.uint16 and case.image.max() == 40000 and case.labels.shape == (1, 8, 8)


def _one_case(root, image=None, labels=None):
    case_dir = root / "train" / "c1"
    case_dir.mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8), np.uint8) if image is None else image).save(case_dir / "image.png")
    for a, label in enumerate([np.zeros((8, 8), np.uint8)] if labels is None else labels):
        Image.fromarray(label).save(case_dir / f"label_{a}.png")
    return case_dir


def test_folder_format_errors_name_the_file(tmp_path):
    with pytest.raises(DatasetError, match=r"classes\.json"):
        open_dataset(str(tmp_path), "train")
    (tmp_path / "classes.json").write_text("{oops")
    with pytest.raises(DatasetError, match="not valid JSON"):
        open_dataset(str(tmp_path), "train")
    (tmp_path / "classes.json").write_text(json.dumps(["background", "lesion"]))
    with pytest.raises(DatasetError, match="no cases"):
        open_dataset(str(tmp_path), "train")
    case_dir = _one_case(tmp_path, labels=[np.full((8, 8), 5, np.uint8)])
    with pytest.raises(DatasetError, match=r"label_0.png: pixel value 5"):
        open_dataset(str(tmp_path), "train")[0]
    Image.fromarray(np.zeros((4, 8), np.uint8)).save(case_dir / "label_0.png")
    with pytest.raises(DatasetError, match=r"label_0.png: label shape"):
        open_dataset(str(tmp_path), "train")[0]
    (case_dir / "label_0.png").unlink()
    with pytest.raises(DatasetError, match="no label_"):
        open_dataset(str(tmp_path), "train")[0]
    (case_dir / "label_0.png").write_bytes(b"not a png")
    with pytest.raises(DatasetError, match=r"label_0.png: not a readable image"):
        open_dataset(str(tmp_path), "train")[0]


def test_unknown_specs_are_errors(tmp_path):
    with pytest.raises(DatasetError, match="unknown synthetic"):
        open_dataset("synthetic:nope", "train")
    with pytest.raises(DatasetError, match="not a folder"):
        open_dataset(str(tmp_path / "missing"), "train")
