"""DICOM and NIfTI inputs written by the libraries' own writers, as a scanner or a converter would
hand them over: a CT series with real geometry and identifiers, and NIfTI volumes in several
orientations."""

from __future__ import annotations

import io

import numpy as np

PATIENT = {"PatientName": "Test^Carseg", "PatientID": "CARSEG-0001", "PatientBirthDate": "19700101", "PatientSex": "O"}
STUDY_UID = "1.2.826.0.1.3680043.8.498.1001"
SERIES_UID = "1.2.826.0.1.3680043.8.498.1002"
FRAME_OF_REFERENCE = "1.2.826.0.1.3680043.8.498.1003"


def ct_slice(hu: np.ndarray, index: int, *, spacing: tuple[float, float] = (0.7, 0.8), thickness: float = 2.5,
             origin: tuple[float, float, float] = (-40.0, -30.0, 100.0), series_uid: str = SERIES_UID,
             window: tuple[float, float] | None = (-600.0, 1500.0), pixel_data: bool = True) -> bytes:
    """One CT Image Storage instance of a (rows, cols) Hounsfield-unit slice at position ``index``."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
    for key, value in PATIENT.items():
        setattr(ds, key, value)
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = STUDY_UID, series_uid, FRAME_OF_REFERENCE
    ds.StudyID, ds.AccessionNumber, ds.StudyDate, ds.StudyTime = "42", "ACC42", "20260101", "120000"
    ds.ReferringPhysicianName, ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "", "CT", 3, index + 1
    ds.Manufacturer, ds.PositionReferenceIndicator = "test", ""
    ds.ImagePositionPatient = [origin[0], origin[1], origin[2] + index * thickness]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing = list(spacing)
    ds.SliceThickness = thickness
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = hu.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = -1024, 1, "HU"
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    if pixel_data:
        ds.PixelData = np.round(hu + 1024).astype(np.int16).tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def nodule_volume(depth: int, size: int = 64, seed: int = 0) -> np.ndarray:
    """(depth, rows, cols) HU: lung (-850) with a bright sphere (+40) off centre, so orientation shows."""
    rng = np.random.default_rng(seed)
    z, y, x = np.mgrid[:depth, :size, :size]
    centre = (depth / 2, size * 0.4, size * 0.6)
    ball = ((z - centre[0]) * 2) ** 2 + (y - centre[1]) ** 2 + (x - centre[2]) ** 2 < (size / 6) ** 2
    return np.where(ball, 40.0, -850.0) + rng.normal(0, 20, (depth, size, size))


def ct_series(depth: int = 4, size: int = 64, **kwargs) -> list[bytes]:
    volume = nodule_volume(depth, size)
    return [ct_slice(volume[i], i, **kwargs) for i in range(depth)]


def nifti_bytes(data: np.ndarray, affine: np.ndarray, gz: bool = True, dtype: type | None = None) -> bytes:
    import gzip

    import nibabel as nib

    image = nib.Nifti1Image(data.astype(dtype) if dtype else data, affine)
    raw = image.to_bytes()
    return gzip.compress(raw) if gz else raw
