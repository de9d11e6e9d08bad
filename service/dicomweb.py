"""A DICOMweb client for the one thing a viewer's image id asks of it: the instances of a series.

OHIF's MONAI Label extension names the image to segment by its SeriesInstanceUID and expects the
server to fetch it from the PACS the viewer shows (MONAI Label's DICOMWebDatastore does the same):
QIDO-RS finds the series' study, WADO-RS retrieves its instances as multipart/related. The download
is bounded by the upload limits, so a PACS cannot hand the service more than a client could."""

from __future__ import annotations

import re

import httpx

from service.errors import InvalidImage, PayloadTooLarge, ServiceError

STUDY_UID_TAG = "0020000D"
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")


class PacsUnavailable(ServiceError):
    status, reason = 502, "pacs_unavailable"


class SeriesNotFound(ServiceError):
    status, reason = 404, "series_not_found"


def split_multipart(body: bytes, content_type: str) -> list[bytes]:
    """The parts' contents of a multipart/related body (WADO-RS answers one DICOM file per part)."""
    match = re.search(r'boundary="?([^";]+)"?', content_type)
    if not match:
        raise InvalidImage(f"the PACS answered {content_type!r}, not multipart/related with a boundary")
    delimiter = b"--" + match.group(1).encode("latin-1")
    parts = []
    for chunk in body.split(delimiter)[1:]:
        if chunk.startswith(b"--"):
            break
        _, _, content = chunk.partition(b"\r\n\r\n")
        parts.append(content[:-2] if content.endswith(b"\r\n") else content)
    return parts


class DicomWeb:
    def __init__(self, url: str, token: str | None, max_bytes: int, timeout_s: float) -> None:
        self.url, self.max_bytes, self.timeout_s = url.rstrip("/"), max_bytes, timeout_s
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}

    async def series(self, series_uid: str) -> list[bytes]:
        """The DICOM files of one series, found by its UID alone."""
        if not _UID.match(series_uid) or len(series_uid) > 64:
            raise SeriesNotFound(f"{series_uid!r} is not a DICOM UID (a series is named by its SeriesInstanceUID)")
        try:
            async with httpx.AsyncClient(timeout=self.timeout_s, headers=self.headers) as client:
                found = await client.get(f"{self.url}/series", params={"SeriesInstanceUID": series_uid}, headers={"Accept": "application/dicom+json"})
                if found.status_code == 204 or (found.status_code == 200 and not found.content.strip(b"[] \n")):
                    raise SeriesNotFound(f"the PACS has no series {series_uid}")
                found.raise_for_status()
                study_uid = found.json()[0][STUDY_UID_TAG]["Value"][0]
                url = f"{self.url}/studies/{study_uid}/series/{series_uid}"
                accept = 'multipart/related; type="application/dicom"; transfer-syntax=*'
                async with client.stream("GET", url, headers={"Accept": accept}) as response:
                    response.raise_for_status()
                    body = bytearray()
                    async for chunk in response.aiter_bytes():
                        body += chunk
                        if len(body) > self.max_bytes:
                            raise PayloadTooLarge(f"series {series_uid} is larger than the upload limit of {self.max_bytes} bytes")
                    content_type = response.headers.get("content-type", "")
        except httpx.HTTPStatusError as exc:
            if exc.response.status_code == 404:
                raise SeriesNotFound(f"the PACS has no series {series_uid}") from exc
            raise PacsUnavailable(f"the PACS answered {exc.response.status_code} for series {series_uid}") from exc
        except (httpx.HTTPError, ValueError, KeyError, IndexError) as exc:
            raise PacsUnavailable(f"the PACS at {self.url} could not be asked for series {series_uid} ({type(exc).__name__}: {exc})") from exc
        return split_multipart(bytes(body), content_type)
