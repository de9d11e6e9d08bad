"""DICOM SEG out (highdicom), referencing the source instances of a DICOM input:

- a BINARY SEG with one segment per sample and foreground class ("sample 3: nodule"), then the
  regions where the sample mean reaches 10, 50 and 90% (nested regions whose outlines are the
  iso-contours: where readers would disagree, in a form every SEG viewer draws);
- a FRACTIONAL (probability) SEG with the sample mean of each foreground class.

Patient, study and frame-of-reference identifiers come from the source instances (highdicom copies
them); nothing is invented but the new series' and instances' own UIDs."""

from __future__ import annotations

import io

import numpy as np

from service.codecs.outputs import zip_bytes
from service.codecs.volume import Volume
from service.errors import InvalidParameter

ISO_LEVELS = (0.1, 0.5, 0.9)
DICOM_SEG_ZIP = "application/zip"
MANUFACTURER = "carseg"


def _description(number: int, label: str, algorithm: object, tracking: str) -> object:
    import highdicom as hd
    from pydicom.sr.codedict import codes

    return hd.seg.SegmentDescription(
        segment_number=number, segment_label=label[:64],
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Lesion,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC, algorithm_identification=algorithm,
        tracking_uid=hd.UID(), tracking_id=tracking[:64],
    )


def _segmentation(volume: Volume, pixels: np.ndarray, kind: str, labels: list[str], model: str, version: str, series: int) -> bytes:
    """(D, H, W, S) -> one SEG instance with S segments."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    algorithm = hd.AlgorithmIdentificationSequence(name=MANUFACTURER, version=f"{model}:{version}", family=codes.cid7162.ArtificialIntelligence)
    descriptions = [_description(i + 1, label, algorithm, label) for i, label in enumerate(labels)]
    fractional = kind == "FRACTIONAL"
    options = (
        {"fractional_type": hd.seg.SegmentationFractionalTypeValues.PROBABILITY, "max_fractional_value": 255} if fractional else {}
    )
    seg = hd.seg.Segmentation(
        source_images=list(volume.sources), pixel_array=pixels, segmentation_type=kind, segment_descriptions=descriptions,
        series_instance_uid=hd.UID(), series_number=series, sop_instance_uid=hd.UID(), instance_number=1,
        manufacturer=MANUFACTURER, manufacturer_model_name=model[:64], software_versions=version[:64], device_serial_number="0",
        content_label="MEAN" if fractional else "SAMPLES", omit_empty_frames=False,
        content_description=f"carseg {model} v{version}: " + ("sample mean" if fractional else "k samples and iso-regions"),
        **options,
    )
    buf = io.BytesIO()
    seg.save_as(buf)
    return buf.getvalue()


def encode_dicom_seg(volume: Volume, labels: np.ndarray, mean: np.ndarray, classes: list[str], model: str, version: str) -> bytes:
    """``labels`` (D, k, H, W) class indices, ``mean`` (D, C-1, H, W) foreground frequencies ->
    a zip of ``samples.dcm`` (BINARY) and ``mean.dcm`` (FRACTIONAL)."""
    if volume.kind != "dicom" or not volume.sources:
        raise InvalidParameter("DICOM SEG output references its source instances: send a DICOM input (an instance, a series or a zip)")
    k = labels.shape[1]
    foreground = classes[1:]
    binary, names = [], []
    for sample in range(k):
        for index, name in enumerate(foreground, start=1):
            binary.append(labels[:, sample] == index)
            names.append(f"sample {sample + 1}: {name}")
    for index, name in enumerate(foreground):
        for level in ISO_LEVELS:
            binary.append(mean[:, index] >= level - 1e-6)
            names.append(f"{name} in >= {round(level * 100)}% of samples")
    samples = _segmentation(volume, np.stack(binary, axis=-1).astype(np.uint8), "BINARY", names, model, version, series=9001)
    fractional = np.clip(mean.transpose(0, 2, 3, 1), 0.0, 1.0).astype(np.float32)
    mean_seg = _segmentation(volume, fractional, "FRACTIONAL", [f"{name}: sample mean" for name in foreground], model, version, series=9002)
    return zip_bytes({"samples.dcm": samples, "mean.dcm": mean_seg})
