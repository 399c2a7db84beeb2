"""Reading torch and safetensors files safely (``weights_only``; safetensors parsed by its header)."""

from __future__ import annotations

import json
import math
import pickle
import struct
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ddsmon.errors import CheckpointError
from ddsmon.loading.wording import _LISTED, _TRUST_HINT, _describe, _first_line


def _torch_load(path: Path, trust: bool) -> Any:
    """``torch.load`` on CPU, ``weights_only`` unless ``trust``; CheckpointError on failure."""
    if path.stat().st_size == 0:
        raise CheckpointError(path, "empty file (0 bytes)")
    try:
        return torch.load(path, map_location="cpu", weights_only=not trust)
    except FileNotFoundError:
        raise
    except pickle.UnpicklingError as exc:
        text = str(exc)
        if "Weights only load failed" in text:
            tail = text.split("WeightsUnpickler error:", 1)[-1]
            what = _first_line(tail.split(" Please use")[0]) or "unsupported content"
            if "global" not in what.lower():  # a damaged pickle, not a disallowed object
                raise CheckpointError(path, f"corrupt pickle in the torch file ({what})") from None
            try:  # every offending global, read from the pickle's opcodes (nothing runs)
                names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
            except Exception:
                names = []
            if names:
                more = ", ..." if len(names) > _LISTED else ""
                shown = ", ".join(sorted(names)[:_LISTED]) + more
                what = f"the file holds {shown}: more than tensors and plain containers"
            raise CheckpointError(
                path, f"refused to unpickle with weights_only=True ({what}); {_TRUST_HINT}"
            ) from None
        raise CheckpointError(path, f"not a readable torch file ({_describe(exc)})") from None
    except Exception as exc:
        text = str(exc)
        if "PytorchStreamReader" in text or "zip archive" in text:
            raise CheckpointError(
                path, f"truncated or corrupt torch zip archive ({_first_line(text)})"
            ) from None
        raise CheckpointError(path, f"not a readable torch file ({_describe(exc)})") from None


_SAFETENSORS_DTYPES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
    "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
    "C64": 8,
}  # fmt: skip


def _read_safetensors(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Tensors and ``__metadata__`` of a safetensors file, header checked first.

    Layout: 8-byte little-endian header length N, N bytes of JSON mapping each name
    to ``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets into the data
    that follows), optional ``"__metadata__"`` (str -> str). The file is read into
    memory rather than memory-mapped, so a writer truncating it meanwhile cannot crash
    the reader.
    """
    data = path.read_bytes()
    if not data:
        raise CheckpointError(path, "empty file (0 bytes)")
    if len(data) < 8:
        raise CheckpointError(path, f"safetensors file too short ({len(data)} bytes)")
    (n,) = struct.unpack("<Q", data[:8])
    if n > len(data) - 8:
        raise CheckpointError(
            path,
            f"safetensors header claims {n} bytes but the file has {len(data) - 8} "
            "after the length (truncated or not safetensors)",
        )
    try:
        header = json.loads(data[8 : 8 + n].decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(path, f"safetensors header is not JSON ({_describe(exc)})") from None
    if not isinstance(header, dict):
        raise CheckpointError(path, "safetensors header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise CheckpointError(path, "safetensors __metadata__ is not an object")
    available = len(data) - 8 - n
    for name, entry in header.items():
        try:
            begin, end = entry["data_offsets"]
            dtype, shape = entry["dtype"], entry["shape"]
            numel = math.prod(int(s) for s in shape)
            width = _SAFETENSORS_DTYPES.get(dtype)
            ok = (
                isinstance(begin, int)
                and isinstance(end, int)
                and 0 <= begin <= end
                and all(isinstance(s, int) and s >= 0 for s in shape)
            )
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(path, f"safetensors header entry {name!r} is malformed") from None
        if not ok:
            raise CheckpointError(path, f"safetensors header entry {name!r} is malformed")
        if end > available:
            raise CheckpointError(
                path,
                f"safetensors tensor {name!r} ends at byte {end} of the data but the file "
                f"holds {available} (truncated)",
            )
        if width is not None and numel * width != end - begin:
            raise CheckpointError(
                path,
                f"safetensors tensor {name!r}: {dtype} {list(shape)} needs {numel * width} "
                f"bytes, the header gives {end - begin}",
            )
    try:
        from safetensors.torch import load as load_safetensors_bytes

        tensors = load_safetensors_bytes(data)
    except Exception as exc:
        raise CheckpointError(path, f"unreadable safetensors file ({_describe(exc)})") from None
    return tensors, {str(k): v for k, v in metadata.items() if isinstance(v, str)}
