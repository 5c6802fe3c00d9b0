"""Read and write safetensors files tensor by tensor, so an export never holds a shard in memory.

The format (github.com/huggingface/safetensors, README "Format"): 8 bytes, a
little-endian u64 N; N bytes of a UTF-8 JSON header mapping each tensor name
to ``{"dtype": "F32", "shape": [...], "data_offsets": [begin, end]}`` (byte
offsets into the data that follows, contiguous and without holes) plus an
optional ``"__metadata__"`` string map; then the data, row-major, little-endian.
The header may end in spaces; like safetensors' own writer, `write_file` pads
it so the data starts at a multiple of 8 bytes.

`write_file` takes each tensor as a *producer* — its dtype, its shape and a
function yielding its bytes in pieces — so an untouched tensor is copied from
the base file range by range (never materialised) and a patched one is
materialised alone. Tensors are written in name order: same inputs, same bytes.

Reads only the files it is given; writes only the file it is asked to write.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

CHUNK = 1 << 22
"""Bytes per read when copying a tensor's range (4 MiB)."""

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}


@dataclass(frozen=True)
class StoredTensor:
    """Where one tensor lies in a safetensors file."""

    path: Path
    dtype: str
    shape: tuple[int, ...]
    begin: int
    """Absolute byte offset in the file."""
    end: int

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def read(self, rows: slice | None = None) -> torch.Tensor:
        """The tensor (or rows ``rows`` of its first dimension), read into fresh memory."""
        start, stop, shape = self.begin, self.end, self.shape
        if rows is not None:
            row_bytes = (self.end - self.begin) // max(1, self.shape[0])
            start, stop = self.begin + rows.start * row_bytes, self.begin + rows.stop * row_bytes
            shape = (rows.stop - rows.start, *self.shape[1:])
        buffer = bytearray(stop - start)
        with open(self.path, "rb") as f:
            f.seek(start)
            f.readinto(buffer)
        if not buffer:
            return torch.empty(shape, dtype=self.torch_dtype)
        return torch.frombuffer(buffer, dtype=self.torch_dtype).reshape(shape)

    def chunks(self) -> Iterator[bytes | memoryview]:
        """The tensor's bytes, `CHUNK` at a time, straight from the file."""
        with open(self.path, "rb") as f:
            f.seek(self.begin)
            left = self.end - self.begin
            while left:
                piece = f.read(min(CHUNK, left))
                if not piece:
                    raise OSError(f"{self.path} ends inside a tensor")
                left -= len(piece)
                yield piece


def read_index(path: Path) -> tuple[dict[str, StoredTensor], dict[str, str]]:
    """Every tensor of a safetensors file, and its ``__metadata__``."""
    path = Path(path)
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    metadata = header.pop("__metadata__", None) or {}
    start = 8 + n
    tensors = {name: StoredTensor(path, info["dtype"], tuple(info["shape"]), start + info["data_offsets"][0],
                                  start + info["data_offsets"][1]) for name, info in header.items()}
    return tensors, metadata


@dataclass(frozen=True)
class Producer:
    """One tensor to write: its dtype (safetensors name), shape, and its bytes in pieces."""

    dtype: str
    shape: tuple[int, ...]
    pieces: Callable[[], Iterator[bytes | memoryview]]

    @property
    def nbytes(self) -> int:
        n = DTYPES[self.dtype].itemsize
        for s in self.shape:
            n *= s
        return n


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """A contiguous tensor's bytes, without a copy."""
    return memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy()) if t.numel() else memoryview(b"")


def write_file(path: Path, tensors: dict[str, Producer], metadata: dict[str, str] | None = None) -> int:
    """Write ``tensors`` (in name order) to ``path``; returns the data size in bytes."""
    header: dict = {}
    offset = 0
    for name in sorted(tensors):
        p = tensors[name]
        header[name] = {"dtype": p.dtype, "shape": list(p.shape), "data_offsets": [offset, offset + p.nbytes]}
        offset += p.nbytes
    if metadata:
        header["__metadata__"] = dict(sorted(metadata.items()))
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-(8 + len(text)) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for name in sorted(tensors):
            written = 0
            for piece in tensors[name].pieces():
                f.write(piece)
                written += len(piece)
            if written != tensors[name].nbytes:
                raise RuntimeError(f"{name}: produced {written} bytes, expected {tensors[name].nbytes}")
    return offset
