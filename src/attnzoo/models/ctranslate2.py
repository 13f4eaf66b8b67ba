"""A reader of CTranslate2's ``model.bin`` (binary version 6), without the ctranslate2 package.

The layout, as written by ``ModelSpec._serialize`` (python/ctranslate2/specs/model_spec.py of
https://github.com/OpenNMT/CTranslate2), all little-endian:

    uint32 binary_version; string spec_name; uint32 spec_revision
    uint32 n_variables, then per variable:
        string name; uint8 rank; rank x uint32 dims; uint8 dtype id; uint32 n_bytes; n_bytes of data
    uint32 n_aliases, then per alias: string alias; string target variable name

A string is a uint16 length counting a trailing NUL, the UTF-8 bytes, and that NUL. Dtype ids follow the
``DataType`` enum: 0 float32, 1 int8, 2 int16, 3 int32, 4 float16, 5 bfloat16. Scalars (rank 0) are the spec's
attributes (``num_heads``, ``activation``, flags); an alias names a variable stored once under another name (a tied
output projection). Quantized weights (``*_scale`` companions) are read as stored, not dequantized.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

SUPPORTED_BINARY_VERSIONS = (6,)
_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16, 5: None}  # 5: bfloat16, by hand


@dataclass
class CTranslate2Model:
    """The content of a model.bin: spec name and revision, variables by name (tensors), aliases (name -> target)."""

    binary_version: int
    spec: str
    revision: int
    variables: dict[str, torch.Tensor] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)

    def __getitem__(self, name: str) -> torch.Tensor:
        name = self.aliases.get(name, name)
        if name not in self.variables:
            raise KeyError(f"{name}: no such variable in this {self.spec} model ({len(self.variables)} variables)")
        return self.variables[name]

    def __contains__(self, name: str) -> bool:
        return self.aliases.get(name, name) in self.variables

    def scalar(self, name: str) -> int | float:
        t = self[name]
        if t.numel() != 1:
            raise ValueError(f"{name}: expected a scalar attribute, got shape {tuple(t.shape)}")
        return t.item()


class _Cursor:
    def __init__(self, data: bytes, path: Path) -> None:
        self.data, self.pos, self.path = data, 0, path

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise ValueError(f"{self.path}: truncated CTranslate2 model (needs {n} bytes at offset {self.pos}, "
                             f"the file has {len(self.data)})")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def unpack(self, fmt: str):
        return struct.unpack("<" + fmt, self.take(struct.calcsize("<" + fmt)))[0]

    def string(self) -> str:
        n = self.unpack("H")
        raw = self.take(n)
        if n == 0 or raw[-1] != 0:
            raise ValueError(f"{self.path}: malformed string at offset {self.pos - n} (no trailing NUL)")
        return raw[:-1].decode("utf-8")


def _tensor(raw: bytes, dtype_id: int, dims: list[int], name: str) -> torch.Tensor:
    if dtype_id not in _DTYPES:
        raise ValueError(f"{name}: unknown CTranslate2 dtype id {dtype_id} (expected 0..5)")
    count = int(np.prod(dims)) if dims else 1
    if dtype_id == 5:  # bfloat16: the upper half of a float32
        bits = np.frombuffer(raw, dtype=np.uint16).astype(np.uint32) << 16
        arr = bits.view(np.float32)
        out = torch.from_numpy(arr.copy()).to(torch.bfloat16)
    else:
        arr = np.frombuffer(raw, dtype=np.dtype(_DTYPES[dtype_id]).newbyteorder("<"))
        out = torch.from_numpy(arr.astype(arr.dtype.newbyteorder("="), copy=True))
    if out.numel() != count:
        raise ValueError(f"{name}: {out.numel()} values stored for shape {tuple(dims)}")
    return out.reshape(dims)


def read_ctranslate2(path: str | os.PathLike) -> CTranslate2Model:
    """Read a CTranslate2 ``model.bin`` (a file, or a directory holding one) into tensors."""
    path = Path(path)
    if path.is_dir():
        path = path / "model.bin"
    cur = _Cursor(path.read_bytes(), path)
    version = cur.unpack("I")
    if version not in SUPPORTED_BINARY_VERSIONS:
        raise ValueError(f"{path}: CTranslate2 binary version {version}; this reader supports "
                         f"{list(SUPPORTED_BINARY_VERSIONS)}")
    model = CTranslate2Model(version, cur.string(), cur.unpack("I"))
    for _ in range(cur.unpack("I")):
        name = cur.string()
        dims = [cur.unpack("I") for _ in range(cur.unpack("B"))]
        dtype_id = cur.unpack("B")
        model.variables[name] = _tensor(cur.take(cur.unpack("I")), dtype_id, dims, name)
    for _ in range(cur.unpack("I")):
        alias, target = cur.string(), cur.string()
        if target not in model.variables:
            raise ValueError(f"{path}: alias {alias!r} points to a missing variable {target!r}")
        model.aliases[alias] = target
    if cur.pos != len(cur.data):
        raise ValueError(f"{path}: {len(cur.data) - cur.pos} bytes after the last alias (not a CTranslate2 model.bin?)")
    return model
