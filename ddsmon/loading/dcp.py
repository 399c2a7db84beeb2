"""torch.distributed.checkpoint folders, read without unpickling anything but DCP's own metadata."""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import io
import logging
import os
import pickle
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ddsmon.checkpoints import RefusedFile, open_regular, stat_regular
from ddsmon.errors import CheckpointError, ConfigError
from ddsmon.loading.key_matching import _apply, _Candidate, _choose, _outside_state_dict
from ddsmon.loading.loaded import LoadedCheckpoint, _build
from ddsmon.loading.step_and_meta import _meta_of, _step_of
from ddsmon.loading.wording import _TRUST_HINT, _describe, _first_line, _short

log = logging.getLogger(__name__)


class _DCPMetadataUnpickler(pickle.Unpickler):
    """Admits only what a torch.distributed.checkpoint ``.metadata`` file is made of."""

    _MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem")

    def find_class(self, module: str, name: str) -> Any:
        if module in self._MODULES:
            obj = getattr(importlib.import_module(module), name, None)
            if isinstance(obj, type) and obj.__module__ == module:
                return obj
        elif module == "torch":
            obj = getattr(torch, name, None)
            if name == "Size" or isinstance(obj, torch.dtype):
                return obj
        elif (module, name) == ("torch.serialization", "_get_layout"):
            return torch.serialization._get_layout
        elif module == "pathlib" and name in (
            "PosixPath",
            "WindowsPath",
            "PurePosixPath",
            "PureWindowsPath",
            "Path",
        ):
            return getattr(importlib.import_module("pathlib"), name)
        elif (module, name) == ("collections", "OrderedDict"):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in DCP metadata")


def _regular_file_system() -> Any:
    """DCP's FileSystem, reading only regular files (:func:`open_regular`): a FIFO or a
    device in place of ``.metadata`` or a data file is refused, never waited on."""
    from torch.distributed.checkpoint.filesystem import FileSystem

    class RegularFileSystem(FileSystem):
        @contextlib.contextmanager
        def create_stream(self, path: str | os.PathLike, mode: str) -> Iterator[Any]:
            if mode != "rb":
                raise PermissionError(f"{path}: ddsmon opens checkpoints for reading only")
            with open_regular(path) as stream:
                yield stream

    return RegularFileSystem()


def _dcp_reader_class() -> type:
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeReader(FileSystemReader):
        """FileSystemReader whose ``.metadata`` goes through the restricted unpickler."""

        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            with open_regular(Path(self.path) / ".metadata") as handle:
                metadata = _DCPMetadataUnpickler(handle).load()
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeReader


def _load_dcp_folder(
    path: Path, factory: Callable[[], nn.Module] | None, trust: bool
) -> LoadedCheckpoint:
    try:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.api import CheckpointException
        from torch.distributed.checkpoint.metadata import (
            BytesStorageMetadata,
            TensorStorageMetadata,
        )
    except Exception as exc:  # a torch built without distributed
        raise CheckpointError(
            path, f"torch.distributed.checkpoint is unavailable ({_describe(exc)})"
        ) from None
    if factory is None:
        raise ConfigError(
            f"{path}: a torch.distributed.checkpoint folder needs a model factory; "
            "pass --model MODULE:FACTORY"
        )
    if os.path.lexists(path) and not path.is_dir():
        raise CheckpointError(path, "not a folder (a torch.distributed.checkpoint is a folder)")
    try:  # missing (FileNotFoundError): the folder is being deleted, as before
        stat_regular(path / ".metadata")
    except RefusedFile as exc:
        raise CheckpointError(path, f".metadata: {exc.reason}") from None
    reader = dcp.FileSystemReader(path) if trust else _dcp_reader_class()(path)
    reader.fs = _regular_file_system()
    try:
        metadata = reader.read_metadata()
        items = dict(metadata.state_dict_metadata)
        storage = dict(metadata.storage_data)
    except FileNotFoundError:
        raise
    except RefusedFile as exc:
        raise CheckpointError(path, f".metadata: {exc.reason}") from None
    except Exception as exc:
        if "not allowed in DCP metadata" in str(exc):
            raise CheckpointError(
                path,
                f"refused to unpickle .metadata: it holds a pickle that would import "
                f"{_first_line(str(exc)).split(' is not allowed')[0]}, which is not DCP "
                f"metadata and was not run; {_TRUST_HINT}",
            ) from None
        raise CheckpointError(path, f"unreadable .metadata ({_describe(exc)})") from None
    try:
        skeleton = _dcp_skeleton(items, storage, TensorStorageMetadata)
    except CheckpointError as exc:
        raise CheckpointError(path, exc.reason) from None
    except Exception as exc:
        raise CheckpointError(path, f"malformed .metadata ({_describe(exc)})") from None
    model = _build(factory)
    chosen = _choose(model, [_Candidate("in the DCP folder", skeleton, top=True)], path)
    wanted = set(chosen.mapping.values())
    wanted |= {k for k, t in skeleton.items() if "." not in k and t.numel() == 1}
    top_bytes = {
        fqn
        for fqn, item in items.items()
        if isinstance(fqn, str) and "." not in fqn and isinstance(item, BytesStorageMetadata)
    }
    _check_data_files(path, storage, wanted | top_bytes)
    request = {k: torch.empty(skeleton[k].shape, dtype=skeleton[k].dtype) for k in sorted(wanted)}
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(request, storage_reader=reader)
    except FileNotFoundError:
        raise
    except (Exception, CheckpointException) as exc:
        # DCP wraps each rank's failure in a CheckpointException (a BaseException).
        failures = getattr(exc, "failures", None) or {}
        causes = [f[0] if isinstance(f, tuple) else f for f in failures.values()]
        if any(isinstance(c, FileNotFoundError) for c in causes):
            raise FileNotFoundError(path) from None
        cause = next((c for c in causes if isinstance(c, BaseException)), exc)
        if isinstance(cause, RefusedFile):
            raise CheckpointError(path, f"data file {cause.path.name}: {cause.reason}") from None
        raise CheckpointError(path, f"cannot read the DCP data ({_short(cause)})") from None

    top: dict[str, Any] = {k: v for k, v in request.items() if "." not in k}
    for fqn in sorted(top_bytes):
        value = _dcp_bytes_item(path, storage, fqn, trust)
        if value is not None:
            top[fqn] = value
    _apply(model, chosen, {**skeleton, **request}, path)
    meta = _meta_of(_outside_state_dict(chosen, top))
    return LoadedCheckpoint(model, _step_of(top), meta, source=chosen.source())


def _check_data_files(path: Path, storage: dict[Any, Any], fqns: set[str]) -> None:
    """Every data file holding one of ``fqns`` is a regular file long enough for the
    slices ``.metadata`` says it holds (so no read waits on a FIFO or runs past the end)."""
    ends: dict[str, int] = {}
    try:
        for index, info in storage.items():
            if getattr(index, "fqn", None) in fqns:
                end = int(info.offset) + int(info.length)
                ends[info.relative_path] = max(ends.get(info.relative_path, 0), end)
    except (AttributeError, TypeError, ValueError) as exc:
        raise CheckpointError(path, f"malformed .metadata ({_describe(exc)})") from None
    for name, end in sorted(ends.items()):
        try:  # missing (FileNotFoundError): the folder is being deleted, as dcp.load says
            size = stat_regular(path / name).st_size
        except RefusedFile as exc:
            raise CheckpointError(path, f"data file {name}: {exc.reason}") from None
        if size < end:
            raise CheckpointError(
                path,
                f"data file {name} has {size} bytes, .metadata says it holds {end} (truncated)",
            )


def _dcp_skeleton(
    items: dict[str, Any], storage: dict[Any, Any], tensor_md: type[Any]
) -> dict[str, Tensor]:
    """Shape-only (meta) tensors for every tensor item; data files must be in the folder."""
    for info in storage.values():
        rel = getattr(info, "relative_path", None)
        if not isinstance(rel, str) or Path(rel).name != rel or rel in ("", ".", ".."):
            raise CheckpointError("", f".metadata names a data file outside the folder: {rel!r}")
    skeleton: dict[str, Tensor] = {}
    for fqn, item in items.items():
        if isinstance(item, tensor_md):
            if not isinstance(fqn, str) or not isinstance(item.properties.dtype, torch.dtype):
                raise CheckpointError("", f".metadata item {fqn!r} is malformed")
            size = tuple(int(s) for s in item.size)
            skeleton[fqn] = torch.empty(size, dtype=item.properties.dtype, device="meta")
    return skeleton


def _dcp_bytes_item(path: Path, storage: dict[Any, Any], fqn: str, trust: bool) -> Any:
    """A small top-level non-tensor DCP item (``step``...), read with weights_only."""
    try:
        for index, info in storage.items():
            if getattr(index, "fqn", None) != fqn:
                continue
            if getattr(info, "transform_descriptors", None) or not 0 < info.length <= 1 << 20:
                return None
            with open_regular(path / info.relative_path) as handle:
                handle.seek(info.offset)
                blob = handle.read(info.length)
            return torch.load(io.BytesIO(blob), map_location="cpu", weights_only=not trust)
    except FileNotFoundError:
        raise
    except Exception as exc:
        log.info("%s: DCP item %r not read (%s)", path, fqn, _describe(exc))
    return None
