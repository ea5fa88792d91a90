"""MNIST's IDX file format (``*-idx3-ubyte``, ``*-idx1-ubyte``, optionally gzipped), read and written.

Layout: two zero bytes, a type code (0x08 = unsigned byte, the only type MNIST-family files use), the number
of dimensions, then each dimension as a big-endian int32, then the values in C order. Images are
``0x0803`` [N, 28, 28]; labels ``0x0801`` [N].

Reading validates everything a truncated download or a mislabelled file breaks, and says which file and
how to fix it, rather than failing later with a reshape error.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path

import numpy as np

from datamodules.base import DatasetError

_UBYTE = 0x08


def _open(path: Path, mode: str):
    return gzip.open(path, mode) if path.suffix == ".gz" else open(path, mode)


def read_idx(path: str | Path, ndim: int | None = None, fix: str = "") -> np.ndarray:
    """The uint8 array stored in an IDX file; ``ndim`` (3 for images, 1 for labels) is checked when given."""
    path = Path(path)
    hint = f" {fix}" if fix else ""
    if not path.is_file():
        raise DatasetError(f"IDX file not found: {path}.{hint}")
    try:
        with _open(path, "rb") as fh:
            data = fh.read()
    except (OSError, EOFError, zlib.error) as err:
        raise DatasetError(f"cannot read {path} ({type(err).__name__}: {err}); the file is corrupt or "
                           f"truncated.{hint}") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise DatasetError(f"{path} is not an IDX file (bad magic number {data[:4].hex() or 'empty'}).{hint}")
    if data[2] != _UBYTE:
        raise DatasetError(f"{path} stores type code 0x{data[2]:02x}; only unsigned-byte IDX files (0x08) are "
                           f"supported.{hint}")
    n_dims = data[3]
    if ndim is not None and n_dims != ndim:
        raise DatasetError(f"{path} has {n_dims} dimension(s) where {ndim} are expected (magic 0x08{ndim:02x}); "
                           f"are image and label files swapped?{hint}")
    header = 4 + 4 * n_dims
    if len(data) < header:
        raise DatasetError(f"{path} is truncated inside its header.{hint}")
    shape = struct.unpack(f">{n_dims}I", data[4:header])
    expected = int(np.prod(shape, dtype=np.int64))
    if len(data) - header != expected:
        raise DatasetError(f"{path} declares shape {shape} ({expected} values) but holds {len(data) - header}; "
                           f"the file is truncated or corrupt.{hint}")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape).copy()


def write_idx(path: str | Path, array: np.ndarray) -> None:
    """Write a uint8 array as IDX (gzipped when ``path`` ends in ``.gz``), atomically."""
    path = Path(path)
    array = np.ascontiguousarray(array)
    if array.dtype != np.uint8:
        raise ValueError(f"IDX files here hold uint8 values, got {array.dtype}")
    header = bytes([0, 0, _UBYTE, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    tmp = path.with_name(path.name + ".tmp")
    # mtime=0 makes the gzip bytes a function of the content alone (reproducible builds).
    if path.suffix == ".gz":
        with open(tmp, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as fh:
            fh.write(header + array.tobytes())
    else:
        tmp.write_bytes(header + array.tobytes())
    tmp.replace(path)
