"""Reading images and masks of a :class:`~covidqu.data.layout.Sample`.

Datasets never decode files themselves: they ask a :class:`SampleReader`. The PNG reader here
decodes from disk; a packed in-memory reader (one array per subset and split) can take its place
later with no change to the datasets or their callers, as long as it returns the same arrays.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol, runtime_checkable

import cv2
import numpy as np

from covidqu.data.layout import DataError, Sample

# Decoding happens in DataLoader workers: keep OpenCV from starting threads of its own there.
cv2.setNumThreads(0)
# A file that fails to decode raises an error naming it (below); OpenCV's own log lines about it
# would only repeat that without the path.
cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)


class ImageDecodeError(DataError):
    """A file that cannot be decoded as an image; ``path`` names it."""

    def __init__(self, message: str, path: str | os.PathLike[str] | None = None) -> None:
        super().__init__(message)
        self.path = None if path is None else str(path)


def decode_png(path: str | os.PathLike[str]) -> np.ndarray:
    """Decode an image file as stored (any depth, 1 to 4 channels); raise naming the file.

    Reads the bytes with NumPy rather than ``cv2.imread`` so that a missing, empty or truncated
    file raises an error naming it instead of returning ``None``.
    """
    p = Path(path)
    try:
        buf = np.fromfile(p, dtype=np.uint8)
    except OSError as err:
        raise ImageDecodeError(f"cannot read {p}: {err.strerror or err}", p) from err
    if buf.size == 0:
        raise ImageDecodeError(f"{p} is an empty file (0 bytes)", p)
    arr = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
    if arr is None or arr.size == 0:
        raise ImageDecodeError(
            f"{p} is not a readable image (corrupt or truncated, {buf.size} bytes)", p
        )
    return arr


def to_gray_u8(arr: np.ndarray) -> np.ndarray:
    """Any decoded image -> 2-D uint8: colour to gray, 16-bit scaled to 8-bit."""
    if arr.ndim == 3:
        if arr.shape[2] == 1:
            arr = arr[:, :, 0]
        else:
            code = cv2.COLOR_BGRA2GRAY if arr.shape[2] == 4 else cv2.COLOR_BGR2GRAY
            arr = cv2.cvtColor(arr, code)
    if arr.dtype == np.uint16:
        arr = (arr.astype(np.float32) * (255.0 / 65535.0) + 0.5).astype(np.uint8)
    elif arr.dtype != np.uint8:
        a = arr.astype(np.float32)
        lo, hi = float(a.min()), float(a.max())
        arr = (
            ((a - lo) * (255.0 / (hi - lo)) + 0.5).astype(np.uint8)
            if hi > lo
            else np.zeros(a.shape, np.uint8)
        )
    return np.ascontiguousarray(arr)


def read_image(path: str | os.PathLike[str]) -> np.ndarray:
    """An image file as a 2-D uint8 array."""
    return to_gray_u8(decode_png(path))


def read_mask(path: str | os.PathLike[str]) -> np.ndarray:
    """A mask file as a 2-D uint8 array in {0, 1} (anything above 0 is foreground)."""
    arr = decode_png(path)
    if arr.ndim == 3:
        arr = arr.max(axis=2)
    return (arr > 0).astype(np.uint8)


@runtime_checkable
class SampleReader(Protocol):
    """Gives the pixels of a sample: a 2-D uint8 image and 2-D uint8 {0, 1} masks."""

    def image(self, sample: Sample) -> np.ndarray: ...

    def mask(self, sample: Sample, kind: str) -> np.ndarray:
        """Its ``lung`` or ``infection`` mask."""
        ...


class PngReader:
    """Decodes each file from disk on every call (the default; no memory held)."""

    def image(self, sample: Sample) -> np.ndarray:
        return read_image(sample.image)

    def mask(self, sample: Sample, kind: str) -> np.ndarray:
        path = sample.mask(kind)
        if path is None:
            raise no_mask(sample, kind)
        return read_mask(path)


def no_mask(sample: Sample, kind: str) -> DataError:
    """The error of a reader asked for a mask kind that ``sample``'s subset does not have."""
    return DataError(
        f"{sample.id} ({sample.subset} subset) has no {kind} mask: targets made of it "
        "need a subset that has it (data=infection)"
    )


#: Readers by the name used in config (``data.reader``).
READERS: dict[str, type] = {"png": PngReader}


def build_reader(name: str | SampleReader) -> SampleReader:
    """A reader from its config name, or the reader itself."""
    if not isinstance(name, str):
        return name
    try:
        return READERS[name]()
    except KeyError:
        raise ValueError(
            f"data.reader={name!r} is not a known reader; choose one of {sorted(READERS)}"
        ) from None
