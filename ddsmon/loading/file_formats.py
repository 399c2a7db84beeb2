"""Reading torch and safetensors files safely: regular files only, bounded reads, no code run.

Every file is opened with :func:`ddsmon.checkpoints.open_regular` (a FIFO, a device, a
socket, a directory or a dangling link is refused before anything is read, and nothing
blocks). Torch files are read with ``weights_only`` unless trusted; a torch zip with a
compressed member is refused (its read would be bounded by the member's declared size,
not the file's). Where there is a model to load into, its keys and shapes are checked
*before* any tensor data is read: a safetensors file's header is parsed and compared
first, a torch zip is first unpickled onto the ``meta`` device (no storage read), and
only the tensors the model takes are then read.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import pickle
import re
import struct
import sys
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch
from torch import Tensor

from ddsmon.checkpoints import (
    SAFETENSORS_MAX_HEADER,
    RefusedFile,
    compressed_member,
    open_regular,
)
from ddsmon.errors import CheckpointError
from ddsmon.loading.wording import _LISTED, _TRUST_HINT, _describe, _first_line

log = logging.getLogger(__name__)

_ZIP_MAGIC = b"PK\x03\x04"


@contextlib.contextmanager
def _open(path: Path) -> Iterator[io.BufferedReader]:
    """:func:`open_regular`, a refusal raised as CheckpointError(path, reason)."""
    try:
        handle = open_regular(path)
    except RefusedFile as exc:
        raise CheckpointError(path, exc.reason) from None
    with handle:
        yield handle


# --------------------------------------------------------------------------- torch files


def _torch_load(
    path: Path, trust: bool, *, before_data: Callable[[Any], None] | None = None
) -> Any:
    """``torch.load`` of the regular file ``path`` on CPU, ``weights_only`` unless ``trust``.

    before_data: called with the checkpoint unpickled onto the ``meta`` device (tensors
    with shapes and dtypes, no data read) before the tensor data is read; it raises to
    stop the load there. Skipped (the full load still happens) for a legacy, non-zip
    file or when torch cannot unpickle the file onto ``meta``.

    Raises CheckpointError on failure, FileNotFoundError when the file is gone.
    """
    with _open(path) as handle:
        size = os.fstat(handle.fileno()).st_size
        if size == 0:
            raise CheckpointError(path, "empty file (0 bytes)")
        zipped = _zip_check(path, handle)
        if before_data is not None and zipped:
            skeleton = _load_onto_meta(path, handle, trust)
            if skeleton is not None:
                before_data(skeleton)
        handle.seek(0)
        return _load(path, handle, trust, "cpu")


def _torch_skeleton(path: Path, trust: bool) -> tuple[Any, bool]:
    """``(checkpoint, on_meta)``: the checkpoint unpickled onto the meta device (no tensor
    data read; ``on_meta`` True), or, where torch cannot do that (a legacy file), read
    whole on CPU (``on_meta`` False). Raises as :func:`_torch_load`."""
    with _open(path) as handle:
        if os.fstat(handle.fileno()).st_size == 0:
            raise CheckpointError(path, "empty file (0 bytes)")
        if _zip_check(path, handle):
            skeleton = _load_onto_meta(path, handle, trust)
            if skeleton is not None:
                return skeleton, True
        handle.seek(0)
        return _load(path, handle, trust, "cpu"), False


def _zip_check(path: Path, handle: BinaryIO) -> bool:
    """Whether the file is a zip (torch's format since 1.6); refuses compressed members."""
    handle.seek(0)
    if handle.read(4) != _ZIP_MAGIC:
        return False
    handle.seek(0)
    try:
        with zipfile.ZipFile(handle) as zf:
            reason = compressed_member(zf.infolist())
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, OSError, NotImplementedError):
        # NotImplementedError: a damaged record claiming a zip version zipfile lacks
        return True  # torch.load says what is wrong with it
    if reason is not None:
        raise CheckpointError(path, reason)
    return True


def _load_onto_meta(path: Path, handle: BinaryIO, trust: bool) -> Any:
    """The checkpoint with every tensor on the meta device (nothing read but the pickle),
    or None when torch cannot do that for this file."""
    handle.seek(0)
    try:
        return torch.load(handle, map_location="meta", weights_only=not trust)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(path, _unpickling_reason(path, handle, exc)) from None
    except Exception as exc:  # the full load reports what is wrong, if anything
        log.debug("%s: not unpickled onto meta (%s); read whole", path, _describe(exc))
        return None


def _load(path: Path, handle: BinaryIO, trust: bool, device: str) -> Any:
    try:
        return torch.load(handle, map_location=device, weights_only=not trust)
    except FileNotFoundError:
        raise
    except pickle.UnpicklingError as exc:
        raise CheckpointError(path, _unpickling_reason(path, handle, exc)) from None
    except Exception as exc:
        text = str(exc)
        if "PytorchStreamReader" in text or "zip archive" in text:
            raise CheckpointError(
                path, f"truncated or corrupt torch zip archive ({_first_line(text)})"
            ) from None
        raise CheckpointError(path, f"not a readable torch file ({_describe(exc)})") from None


# torch's WeightsUnpickler names the global it stopped at in one of these two forms.
_BLOCKED_GLOBAL = re.compile(
    r"GLOBAL (\S+) (?:was not an allowed global by default|whose module \S+ is blocked)"
)


def _unpickling_reason(path: Path, handle: BinaryIO, exc: pickle.UnpicklingError) -> str:
    """Why ``torch.load(weights_only=True)`` refused the file, in ddsmon's words."""
    text = str(exc)
    if "Weights only load failed" not in text:
        return f"not a readable torch file ({_describe(exc)})"
    found = _BLOCKED_GLOBAL.search(text)
    if found is None:
        if "must be imported to load" in text:  # DTensors, nested jagged tensors
            what = next(line for line in text.splitlines() if "must be imported" in line)
            return f"refused to unpickle with weights_only=True ({what.strip()}); {_TRUST_HINT}"
        # A damaged pickle (an unknown opcode...), not a disallowed object.
        detail = text.split("WeightsUnpickler error:", 1)[-1].split("Check the documentation")[0]
        lines = [line.strip() for line in detail.splitlines() if line.strip()]
        last = lines[-1] if lines and "WeightsUnpickler" in text else "unsupported content"
        return f"corrupt pickle in the torch file ({_first_line(last)})"
    stopped = found.group(1)
    if "." not in stopped:  # torch writes builtins.exec as "exec"
        stopped = f"builtins.{stopped}"
    try:  # every offending global, read from the pickle's opcodes (nothing runs)
        handle.seek(0)
        names = set(torch.serialization.get_unsafe_globals_in_checkpoint(handle))
    except Exception:
        names = set()
    ordered = sorted(names - {stopped})
    shown = sorted([stopped, *ordered[: _LISTED - 1]])
    more = f" and {len(ordered) - (_LISTED - 1)} more" if len(ordered) > _LISTED - 1 else ""
    return (
        f"refused to unpickle with weights_only=True: the file holds a pickle that would "
        f"import {', '.join(shown)}{more} (more than tensors and plain containers), which "
        f"was not run; {_TRUST_HINT}"
    )


# --------------------------------------------------------------------------- safetensors


def _safetensors_dtypes() -> dict[str, torch.dtype]:
    names = {
        "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
        "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8",
        "U64": "uint64", "U32": "uint32", "U16": "uint16", "U8": "uint8", "BOOL": "bool",
        "F8_E4M3": "float8_e4m3fn", "F8_E4M3FNUZ": "float8_e4m3fnuz",
        "F8_E5M2": "float8_e5m2", "F8_E5M2FNUZ": "float8_e5m2fnuz", "C64": "complex64",
    }  # fmt: skip
    found = {code: getattr(torch, name, None) for code, name in names.items()}
    return {code: dtype for code, dtype in found.items() if isinstance(dtype, torch.dtype)}


_SAFETENSORS_DTYPES = _safetensors_dtypes()  # the safetensors library's own table for torch


@dataclass(frozen=True)
class _Entry:
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int


@dataclass
class _Header:
    """A safetensors file's parsed header; ``data_start`` is where the data begins."""

    entries: dict[str, _Entry]
    metadata: dict[str, str]
    data_start: int

    def skeleton(self) -> dict[str, Tensor]:
        """A meta tensor (shape and dtype, no data) per entry: what key matching needs."""
        return {
            name: torch.empty(e.shape, dtype=e.dtype, device="meta")
            for name, e in self.entries.items()
        }


def _safetensors_header(path: Path, handle: BinaryIO) -> _Header:
    """Parse and check the header of an open safetensors file (reads only the header).

    Layout: 8-byte little-endian header length N, N bytes of JSON mapping each name to
    ``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets into the data that
    follows), optional ``"__metadata__"`` (str -> str).
    """
    size = os.fstat(handle.fileno()).st_size
    if size == 0:
        raise CheckpointError(path, "empty file (0 bytes)")
    if size < 8:
        raise CheckpointError(path, f"safetensors file too short ({size} bytes)")
    handle.seek(0)
    (n,) = struct.unpack("<Q", handle.read(8))
    if n > size - 8:
        raise CheckpointError(
            path,
            f"safetensors header claims {n} bytes but the file has {size - 8} "
            "after the length (truncated or not safetensors)",
        )
    if n > SAFETENSORS_MAX_HEADER:
        raise CheckpointError(
            path, f"safetensors header of {n} bytes, more than the {SAFETENSORS_MAX_HEADER} allowed"
        )
    raw = handle.read(n)
    if len(raw) != n:
        raise CheckpointError(path, "safetensors file shrank while its header was read")
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(path, f"safetensors header is not JSON ({_describe(exc)})") from None
    if not isinstance(header, dict):
        raise CheckpointError(path, "safetensors header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise CheckpointError(path, "safetensors __metadata__ is not an object")
    available = size - 8 - n
    entries = {}
    for name, entry in header.items():
        try:
            begin, end = entry["data_offsets"]
            code, shape = entry["dtype"], entry["shape"]
            ok = (
                isinstance(begin, int)
                and isinstance(end, int)
                and 0 <= begin <= end
                and isinstance(shape, list)
                and all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape)
            )
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(path, f"safetensors header entry {name!r} is malformed") from None
        if not ok or not isinstance(code, str):
            raise CheckpointError(path, f"safetensors header entry {name!r} is malformed")
        if end > available:
            raise CheckpointError(
                path,
                f"safetensors tensor {name!r} ends at byte {end} of the data but the file "
                f"holds {available} (truncated)",
            )
        dtype = _SAFETENSORS_DTYPES.get(code)
        if dtype is None:
            raise CheckpointError(
                path, f"safetensors tensor {name!r} has dtype {code!r}, which torch cannot hold"
            )
        numel = math.prod(shape)
        if numel * dtype.itemsize != end - begin:
            raise CheckpointError(
                path,
                f"safetensors tensor {name!r}: {code} {list(shape)} needs "
                f"{numel * dtype.itemsize} bytes, the header gives {end - begin}",
            )
        entries[str(name)] = _Entry(dtype, tuple(shape), begin, end)
    meta = {str(k): v for k, v in metadata.items() if isinstance(v, str)}
    return _Header(entries, meta, 8 + n)


def _safetensors_read(
    path: Path, handle: io.BufferedReader, header: _Header, names: list[str]
) -> dict[str, Tensor]:
    """The tensors ``names`` of the file: each read on its own, exactly its bytes.

    Read rather than memory-mapped, so a writer truncating the file meanwhile cannot
    crash the reader (a mapped page past the end is a SIGBUS).
    """
    out: dict[str, Tensor] = {}
    for name in names:
        entry = header.entries[name]
        nbytes = entry.end - entry.begin
        if nbytes == 0:
            out[name] = torch.empty(entry.shape, dtype=entry.dtype)
            continue
        buffer = bytearray(nbytes)
        handle.seek(header.data_start + entry.begin)
        if handle.readinto(buffer) != nbytes:
            raise CheckpointError(path, f"safetensors file shrank while {name!r} was read")
        tensor = torch.frombuffer(buffer, dtype=entry.dtype).reshape(entry.shape)
        if sys.byteorder == "big":  # safetensors is little-endian, as its library does
            tensor = torch.from_numpy(tensor.numpy().byteswap(inplace=False))
        out[name] = tensor
    return out


def _read_safetensors(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Every tensor and the ``__metadata__`` of a safetensors file, header checked first."""
    with _open(path) as handle:
        header = _safetensors_header(path, handle)
        return _safetensors_read(path, handle, header, list(header.entries)), header.metadata
