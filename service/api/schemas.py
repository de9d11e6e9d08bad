"""Pydantic models at the API boundary."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class ImageJSON(BaseModel):
    """A JSON request: the image file's bytes (PNG, JPEG or .npy), base64-encoded."""

    # strict: "seed": false or "k": "4" is a client's mistake to report, not a value to coerce
    model_config = ConfigDict(strict=True)

    image: str = Field(description="base64 of a PNG (8/16-bit), JPEG or .npy file")
    k: int | None = Field(None, description="number of samples; overrides the query parameter")
    seed: int | None = Field(None, description="noise seed; overrides the query parameter")


class InferenceMeta(BaseModel):
    """What every inference response says about how it was made."""

    model: str
    version: str
    k: int
    seed: int
    height: int
    width: int
    classes: list[str]


class SampleResponse(InferenceMeta):
    masks: list[str] = Field(description="k base64 PNGs, 8-bit, pixel = class index")


class UncertaintyResponse(InferenceMeta):
    arrays: dict[str, str] = Field(
        description="base64 .npy files: probabilities (C,H,W) = p_F, aleatoric_entropy, sample_entropy, "
        "mutual_information, sample_variance (H,W); entropies in nats"
    )
    preview: str | None = Field(None, description="base64 PNG heat map of sample_entropy on [0, log C]")


class ContourLevel(BaseModel):
    level: float
    polygons: list[list[list[float]]] = Field(
        description="closed polygons, each [[x, y], ...] in pixel coordinates (x = column, y = row, pixel centres at integers); "
        "the last vertex joins the first"
    )


class ContourResponse(InferenceMeta):
    levels: list[float] = Field(description="the sample frequencies the contours are drawn at")
    contours: dict[str, list[ContourLevel]] = Field(description="per foreground class: its iso-contours, one entry per level")
    mean: dict[str, str] = Field(description="per foreground class: base64 8-bit PNG of the fraction of samples labelling it (value * 255)")
    image: str = Field(description="base64 8-bit PNG (grey or RGB) of the input as the model saw it, to draw the contours over")


class InputSpec(BaseModel):
    channels: int
    dtype: list[str]
    max_side: int
    max_pixels: int
    normalisation: dict[str, float]
    sees_position: bool = Field(
        description="true: the model uses where each pixel lies in the image, so send images framed as its training "
        "images were (`data`): for LIDC-like models, crops centred on the lesion",
    )


class ModelSummary(BaseModel):
    name: str
    version: str
    versions: list[str]
    classes: list[str]


class ModelDetail(ModelSummary):
    input: InputSpec
    sha256: dict[str, str]
    metrics: dict
    data: dict
    training: dict


class ModelList(BaseModel):
    models: list[ModelSummary]


class ErrorResponse(BaseModel):
    error: str
    detail: str
