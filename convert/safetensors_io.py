"""A streaming safetensors reader: memory-maps each file and hands out slices of one tensor.

Reading a slice touches only its pages, so no tensor (let alone the checkpoint) is ever loaded
whole unless asked for. bf16 goes through ml_dtypes' numpy dtype, never through float32.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import ml_dtypes
import numpy as np

DTYPES = {
    "BF16": ml_dtypes.bfloat16,
    "F16": np.float16,
    "F32": np.float32,
    "F64": np.float64,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
    "F8_E4M3": ml_dtypes.float8_e4m3fn,
    "F8_E5M2": ml_dtypes.float8_e5m2,
}


class SafetensorsCheckpoint:
    """All tensors of a HF directory: `model.safetensors` or a sharded index."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        index = self.directory / "model.safetensors.index.json"
        single = self.directory / "model.safetensors"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        elif single.exists():
            files = ["model.safetensors"]
        else:
            found = sorted(p.name for p in self.directory.glob("*.safetensors"))
            if not found:
                raise FileNotFoundError(
                    f"{self.directory}: no model.safetensors or model.safetensors.index.json"
                )
            files = found
        self._where: dict[str, tuple[Path, dict]] = {}
        self._maps: dict[Path, np.memmap] = {}
        for name in files:
            path = self.directory / name
            header, offset = _read_header(path)
            for tensor, info in header.items():
                if tensor == "__metadata__":
                    continue
                info = dict(info, base=offset)
                self._where[tensor] = (path, info)

    def names(self) -> list[str]:
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._where[name][1]["shape"])

    def tensor(self, name: str) -> np.ndarray:
        """A zero-copy read-only view of the tensor (pages load as they are touched)."""
        path, info = self._where[name]
        if info["dtype"] not in DTYPES:
            raise ValueError(
                f"{name}: dtype {info['dtype']} is not supported; allowed: {sorted(DTYPES)}"
            )
        if path not in self._maps:
            self._maps[path] = np.memmap(path, dtype=np.uint8, mode="r")
        start, end = info["data_offsets"]
        raw = self._maps[path][info["base"] + start : info["base"] + end]
        return raw.view(DTYPES[info["dtype"]]).reshape(info["shape"])


def _read_header(path: Path) -> tuple[dict, int]:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return header, 8 + n
