"""From an uploaded image file to face crops, with each failure mapped to a clear 4xx."""

from __future__ import annotations

import numpy as np
from fastapi import HTTPException, UploadFile

from app.uploads import read_bounded
from facegrad.data.imageio import ImageError, decode_image
from facegrad.recognition.detect import crop_faces
from facegrad.service.settings import Settings


def faces_of_upload(file: UploadFile, settings: Settings, detect: str, max_faces: int = 10
                    ) -> tuple[list[tuple[list[int] | None, np.ndarray]], str | None]:
    """[(box or None, stored-format crop)], biggest first, and a note when no face was found."""
    name = file.filename or "upload"
    data = read_bounded(file, settings.max_identify_bytes, f"file {name!r}")
    try:
        rgb = decode_image(data, max_pixels=settings.max_image_pixels, filename=name)
    except ImageError as e:
        raise HTTPException(e.status, f"file {name!r}: {e.reason}") from e
    found = crop_faces(rgb, detect, max_faces=max_faces)
    faces = [(None if box is None else [int(v) for v in box], crop) for box, crop in found]
    note = None if faces else "no face found in this image"
    return faces, note
