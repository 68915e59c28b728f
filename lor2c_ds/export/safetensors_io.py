"""Safetensors at the level the export needs: headers without data, one tensor at a time in, and a
shard writer whose header is planned up front so tensors stream out one by one."""
from __future__ import annotations

import functools
import json
import math
import os
import re
import struct
from pathlib import Path

import torch
from safetensors import safe_open

INDEX_NAME = "model.safetensors.index.json"
_ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
              torch.uint8: "U8", torch.bool: "BOOL"}
_FROM_ST = {v: k for k, v in _ST_DTYPES.items()}


class ExportError(ValueError):
    """Bad input or a failed check; the message says which."""


def _base_tensors(base: Path) -> dict[str, tuple[Path, torch.dtype, tuple[int, ...]]]:
    """name -> (file, dtype, shape) of every tensor in the base checkpoint, read from headers only."""
    index = base / INDEX_NAME
    if index.is_file():
        files = sorted({base / f for f in json.loads(index.read_text())["weight_map"].values()})
    elif (base / "model.safetensors").is_file():
        files = [base / "model.safetensors"]
    else:
        raise ExportError(f"base model directory {base} has no safetensors weights "
                          f"(model.safetensors or {INDEX_NAME}); pickled weights are not read")
    out = {}
    for f in files:
        with safe_open(str(f), "pt") as st:
            for k in st.keys():
                s = st.get_slice(k)
                out[k] = (f, _FROM_ST[s.get_dtype()], tuple(s.get_shape()))
    return out


@functools.lru_cache(maxsize=64)
def _header(file: str) -> tuple[int, dict]:
    with open(file, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        return 8 + size, json.loads(f.read(size))


def _read_tensor(file: Path, key: str) -> torch.Tensor:
    """One tensor, read into fresh memory with plain reads (no mapping of the file stays resident)."""
    start, header = _header(str(file))
    entry = header[key]
    begin, end = entry["data_offsets"]
    buf = torch.empty(end - begin, dtype=torch.uint8)
    with open(file, "rb") as f:
        f.seek(start + begin)
        if f.readinto(buf.numpy()) != end - begin:
            raise ExportError(f"{file} is truncated (tensor {key})")
    return buf.view(_FROM_ST[entry["dtype"]]).reshape(entry["shape"])


def _parse_size(size) -> int:
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?B?)\s*", str(size).upper())
    if not m:
        raise ExportError(f"cannot read shard size {size!r} (examples: 500MB, 2GB, 1000000)")
    unit = {"": 1, "B": 1, "K": 10**3, "KB": 10**3, "M": 10**6, "MB": 10**6, "G": 10**9, "GB": 10**9}[m.group(2)]
    return int(float(m.group(1)) * unit)


def _write_shard(path: Path, entries: list[tuple[str, torch.dtype, tuple[int, ...]]], produce,
                 metadata: dict[str, str]) -> None:
    """A safetensors file whose header is known up front; tensors are produced and written one by one."""
    header, offset = {}, 0
    for name, dtype, shape in entries:
        nbytes = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header["__metadata__"] = metadata
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, dtype, shape in entries:
            t = produce(name)
            if t.dtype != dtype or tuple(t.shape) != tuple(shape):
                raise ExportError(f"{name}: produced {t.dtype} {tuple(t.shape)}, planned {dtype} {shape}")
            if t.numel():
                f.write(t.contiguous().reshape(-1).view(torch.uint8).numpy().data)
            del t
        f.flush()
        os.fsync(f.fileno())
