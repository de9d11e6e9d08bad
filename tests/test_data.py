import json
from collections import Counter

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from training.data import DatasetError, draw_indices, open_dataset
from training.data.cells import CELL_CLASSES, CELL_COLOURS, CELL_KINDS, MIX_LEVELS, MIX_PAIRS, RARE_CELL_KINDS, RARE_MIX_LEVELS
from training.data.folder import write_case, write_classes
from training.data.synthetic import FLIP_CLASSES, HALO_CLASSES, HALO_KINDS, SyntheticDataset


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


@pytest.mark.parametrize("generator", ["halo", "flips", "cells", "cells_rare"])
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


def test_halo_vessel_cross_sections_reach_radius_3_and_are_never_annotated(monkeypatch):
    from training.data import synthetic

    drawn = []
    vessels = synthetic._vessels
    monkeypatch.setattr(synthetic, "_vessels", lambda rng, size: drawn.append(vessels(rng, size)) or drawn[-1])
    cases = list(SyntheticDataset("halo", "test", 30))
    assert len(drawn) == len(cases)
    disc = np.hypot(*np.mgrid[-2:3, -2:3]) <= 2
    blob_radii, nodule_radii = [], []
    for case, share in zip(cases, drawn, strict=True):
        lesion = case.truth.marginals(2)[1] > 0
        assert not case.labels[:, (share > 0.2) & ~lesion].any(), case.case_id
        # at full contrast, vessels in the slice are under 3 px wide, so the parts where a 5 px disc
        # fits are cross-sections (radius r is at full contrast out to sqrt((r + 1/2)^2 - 4) px)
        full = share >= 0.99
        blobs, _ = ndimage.label(full)
        wide = np.unique(blobs[ndimage.binary_opening(full, structure=disc)])
        blob_radii += [np.sqrt((blobs == b).sum() / np.pi) for b in wide[wide > 0]]
        nodule_radii.append(np.sqrt(lesion.sum() / np.pi))
    # a cross-section of radius 2.8-3 shows 21-25 px at full contrast: r_eq 2.6-2.8
    assert sum(2.5 < r < 3.0 for r in blob_radii) >= 5
    assert np.mean(nodule_radii) > 2 * np.mean(blob_radii)


def test_synthetic_image_shapes():
    halo = SyntheticDataset("halo", "val", 2)[1]
    flips = SyntheticDataset("flips", "val", 2)[1]
    assert halo.image.shape == (128, 128, 1) and flips.image.shape == (64, 64, 3)
    assert flips.labels.max() < len(FLIP_CLASSES)
    cells = open_dataset("synthetic:cells", "val", length=2)
    assert cells.classes == CELL_CLASSES and len(cells.classes) == 4 and cells.in_channels == 3
    assert cells[1].image.shape == (64, 64, 3) and cells[1].image.dtype == np.uint8 and cells[1].labels.shape == (4, 64, 64)
    assert cells.description["event_probabilities"] == CELL_KINDS


def test_cells_hold_several_events_each_on_its_own_cell():
    cells, events = [], []
    for case in SyntheticDataset("cells", "test", 100):
        truth = case.truth
        regions = [e.region for e in truth.events]
        # an event's pixels are no other's: a mixed cell's base is its first type, a membrane's background
        assert all((truth.base[e.region] == e.off_label).all() for e in truth.events)
        assert np.all(np.sum(regions, axis=0) <= 1)
        cells.append(ndimage.label(np.any([truth.base > 0, *regions], axis=0))[1])  # cells never touch: one component each
        events.append(len(regions))
    assert np.mean([2 <= n <= 4 for n in cells]) > 0.9
    assert np.mean(events) > 2 and np.mean([n >= 2 for n in events]) > 0.7


CELL_VARIANTS = pytest.mark.parametrize(("generator", "levels", "kinds"), [("cells", MIX_LEVELS, CELL_KINDS), ("cells_rare", RARE_MIX_LEVELS, RARE_CELL_KINDS)])


@CELL_VARIANTS
def test_cells_annotators_follow_the_event_probabilities(generator, levels, kinds):
    hits: Counter[str] = Counter()
    draws: Counter[str] = Counter()
    assert SyntheticDataset(generator, "train", 1).description["event_probabilities"] == kinds
    for case in SyntheticDataset(generator, "train", 400):
        for event in case.truth.events:
            assert event.probability == kinds[event.kind]
            region = case.labels[:, event.region]
            assert (region == region[:, :1]).all()  # each annotator labels a cell or membrane whole
            hits[event.kind] += int((region[:, 0] == event.on_label).sum())
            draws[event.kind] += len(region)
    assert set(draws) == set(kinds) == {f"mix_{t:g}" for t in levels[1:-1]} | {"membrane_0.3", "membrane_0.6"}
    for kind, p in kinds.items():
        # within 4 standard errors of the binomial share (0.06 for a mix kind, 0.1 for a membrane kind)
        assert abs(hits[kind] / draws[kind] - p) < 4 * np.sqrt(p * (1 - p) / draws[kind]), (kind, hits[kind], draws[kind])


def _cytoplasm_colour(image, region):
    pixels = image[region].astype(np.float64)
    brightness = pixels.sum(1)
    return pixels[brightness >= np.median(brightness)].mean(0)  # the brighter half: the nucleus is darker


@CELL_VARIANTS
def test_cells_ambiguity_is_read_from_the_colour(generator, levels, kinds):
    # the nearest of all colours a cell can have (each pair of types, each mixing level) says both
    # its types and its probability: pure cells are never events, mixed cells events of that level
    # (cells_rare's 0.05 mix lies 6 colour units from its pure type, where pixel noise makes this
    # brighter-half estimate misread ~0.3% of cells; a net sees every pixel of the cell)
    grid = [(first, second, t, (1 - t) * CELL_COLOURS[first - 1] + t * CELL_COLOURS[second - 1]) for first, second in MIX_PAIRS for t in levels]
    misread, cells_seen = [], 0
    for case in SyntheticDataset(generator, "test", 150):
        truth = case.truth
        mixed = [e for e in truth.events if e.kind.startswith("mix_")]
        cells, count = ndimage.label(np.any([truth.base > 0, *(e.region for e in mixed)], axis=0))
        for index in range(1, count + 1):
            cell = cells == index
            first, second, t, _ = min(grid, key=lambda g: np.linalg.norm(g[3] - _cytoplasm_colour(case.image, cell)))
            event = next((e for e in mixed if e.region[cell].all()), None)
            cells_seen += 1
            if t in (0.0, 1.0):
                read = event is None and (truth.base[cell] == (first if t == 0.0 else second)).all()
            else:
                read = event is not None and (event.off_label, event.on_label, event.probability) == (first, second, t)
            if not read:
                misread.append(case.case_id)
        for event in truth.events:
            if event.kind.startswith("membrane_"):
                # a membrane's contrast against the background around it is its probability
                inside = ndimage.binary_fill_holes(event.region) & ~event.region
                around = ndimage.binary_dilation(event.region, iterations=2) & ~event.region & ~inside
                background = case.image[around].astype(np.float64).mean(0)
                cell = _cytoplasm_colour(case.image, inside) - background
                contrast = (case.image[event.region].mean(0) - background) @ cell / (cell @ cell)
                assert abs(contrast - event.probability) < 0.1, (case.case_id, contrast, event.probability)
    assert len(misread) <= (0 if generator == "cells" else 0.01 * cells_seen), misread


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


def test_a_mixture_draws_each_part_by_its_share_and_a_pass_visits_every_case_once(lidc_root):
    mixed = open_dataset("synthetic:halo@3+lidc-sample", "val", length=5)
    real = open_dataset("lidc-sample", "val")
    assert len(mixed) == 5 + len(real) and mixed.classes == real.classes and mixed.in_channels == 1
    ids = [mixed[i].case_id for i in range(len(mixed))]
    assert ids == [f"halo-val-{i}" for i in range(5)] + [real[i].case_id for i in range(len(real))]
    assert [p["share"] for p in mixed.description["parts"]] == [0.75, 0.25]
    assert mixed.description["source"] == "synthetic:halo+lidc-sample"
    # 19 real crops beside a million synthetic cases still make up their share of the draws
    train = open_dataset("synthetic:halo+lidc-sample", "train")
    draws = np.array(draw_indices(train, np.random.default_rng(0), 4000))
    real_draws = draws[draws >= 1_000_000] - 1_000_000
    assert abs(len(real_draws) / 4000 - 0.5) < 0.03 and set(real_draws.tolist()) == set(range(len(real)))
    with pytest.raises(IndexError):
        mixed[len(mixed)]


def test_a_single_spec_draws_as_before_a_mixture_existed():
    # the same crops for the same seed as every run trained before mixtures
    halo = open_dataset("synthetic:halo", "train")
    assert draw_indices(halo, np.random.default_rng(3), 8) == np.random.default_rng(3).integers(0, 1_000_000, 8).tolist()


def test_a_folder_whose_name_holds_a_plus_is_a_folder_not_a_mixture(tmp_path):
    root = tmp_path / "ct+pet"
    write_classes(root, HALO_CLASSES)
    write_case(root / "train", open_dataset("synthetic:halo", "test")[0])
    assert len(open_dataset(str(root), "train")) == 1


def test_mixture_specs_that_cannot_be_trained_are_errors():
    with pytest.raises(DatasetError, match="must agree"):
        open_dataset("synthetic:halo+synthetic:flips", "train")
    with pytest.raises(DatasetError, match="not a number"):
        open_dataset("synthetic:halo@x+synthetic:halo", "train")
    with pytest.raises(DatasetError, match="must be > 0"):
        open_dataset("synthetic:halo@0+synthetic:halo", "train")
    with pytest.raises(DatasetError, match="empty part"):
        open_dataset("synthetic:halo+", "train")
