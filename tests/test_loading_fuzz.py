"""Fuzz the checkpoint and probe loaders: clear errors (CheckpointError/ConfigError) or success.

Each property writes hypothesis-chosen bytes or objects to a real file and loads it;
any exception other than the two ddsmon errors fails the test.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from fixtures_models import mlp, mlp_probe
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save as safetensors_bytes

from ddsmon.errors import CheckpointError, ConfigError
from ddsmon.loading import load_checkpoint, load_probe

FUZZ = settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    database=None,
)


@dataclass
class Ref:
    path: Path
    kind: str


def _torch_bytes(obj: object, *, zip_format: bool = True) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer, _use_new_zipfile_serialization=zip_format)
    return buffer.getvalue()


_CHECKPOINT = {"state_dict": mlp(seed=1).state_dict(), "step": 5, "val_acc": 0.5}
VALID_TORCH = _torch_bytes(_CHECKPOINT)
VALID_LEGACY = _torch_bytes(_CHECKPOINT, zip_format=False)  # torch.save's pre-1.6 format
VALID_SAFETENSORS = safetensors_bytes(
    {k: v.contiguous() for k, v in mlp(seed=1).state_dict().items()}, metadata={"step": "5"}
)


def damaged(valid: bytes) -> st.SearchStrategy[bytes]:
    """Random bytes, truncations, byte flips, spliced garbage, and the file intact."""
    n = len(valid)
    flips = st.lists(st.tuples(st.integers(0, n - 1), st.integers(1, 255)), min_size=1, max_size=8)

    def flip(edits: list[tuple[int, int]]) -> bytes:
        data = bytearray(valid)
        for pos, mask in edits:
            data[pos] ^= mask
        return bytes(data)

    # Flips in the first 4 KiB hit headers and the pickle, where damage matters most.
    head_flips = st.lists(
        st.tuples(st.integers(0, min(n, 4096) - 1), st.integers(1, 255)), min_size=1, max_size=4
    )
    splice = st.tuples(st.integers(0, n), st.integers(0, n), st.binary(max_size=64)).map(
        lambda t: valid[: min(t[0], t[1])] + t[2] + valid[max(t[0], t[1]) :]
    )
    return st.one_of(
        st.binary(max_size=512),
        st.integers(0, n).map(lambda k: valid[:k]),
        flips.map(flip),
        head_flips.map(flip),
        splice,
        st.just(valid),
    )


def _load(path: Path, kind: str) -> None:
    try:
        loaded = load_checkpoint(Ref(path, kind), mlp)
    except (CheckpointError, ConfigError) as exc:
        assert str(exc)
        return
    assert isinstance(loaded.model, torch.nn.Module)
    assert loaded.step is None or loaded.step >= 0


@FUZZ
@given(data=damaged(VALID_TORCH))
def test_damaged_torch_files(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "fuzz.pt"
    path.write_bytes(data)
    _load(path, "torch")


@settings(FUZZ, max_examples=150)
@given(data=damaged(VALID_LEGACY))
def test_damaged_legacy_torch_files(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "fuzz.pt"
    path.write_bytes(data)
    _load(path, "torch")


@FUZZ
@given(data=damaged(VALID_SAFETENSORS))
def test_damaged_safetensors_files(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "fuzz.safetensors"
    path.write_bytes(data)
    _load(path, "safetensors")


def test_intact_files_load(tmp_path: Path) -> None:
    """The fuzz baselines are loadable, so damage (not the baseline) is what is tested."""
    (tmp_path / "ok.pt").write_bytes(VALID_TORCH)
    (tmp_path / "legacy.pt").write_bytes(VALID_LEGACY)
    (tmp_path / "ok.safetensors").write_bytes(VALID_SAFETENSORS)
    assert load_checkpoint(Ref(tmp_path / "ok.pt", "torch"), mlp).step == 5
    assert load_checkpoint(Ref(tmp_path / "legacy.pt", "torch"), mlp).step == 5
    assert load_checkpoint(Ref(tmp_path / "ok.safetensors", "safetensors"), mlp).step == 5


@pytest.fixture(scope="module")
def dcp_metadata(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bytes]:
    import torch.distributed.checkpoint as dcp

    folder = tmp_path_factory.mktemp("dcp")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save({"model": mlp(seed=1).state_dict(), "step": 5}, checkpoint_id=folder)
    return folder, (folder / ".metadata").read_bytes()


@settings(FUZZ, max_examples=150)
@given(
    edits=st.lists(st.tuples(st.integers(0, 10**6), st.integers(1, 255)), min_size=1, max_size=4)
)
def test_damaged_dcp_metadata(
    dcp_metadata: tuple[Path, bytes], edits: list[tuple[int, int]]
) -> None:
    folder, valid = dcp_metadata
    data = bytearray(valid)
    for pos, mask in edits:
        data[pos % len(data)] ^= mask
    (folder / ".metadata").write_bytes(bytes(data))
    try:
        _load(folder, "dcp")
    finally:
        (folder / ".metadata").write_bytes(valid)


# --------------------------------------------------------------------------- probes

_dtypes = st.sampled_from([torch.float32, torch.float64, torch.long, torch.bool, torch.uint8])
_tensors = st.builds(
    lambda shape, dtype: torch.zeros(shape, dtype=dtype),
    st.lists(st.integers(0, 4), max_size=3),
    _dtypes,
)
_leaves = st.one_of(
    _tensors,
    st.none(),
    st.booleans(),
    st.integers(-5, 5),
    st.floats(allow_nan=True),
    st.text(max_size=4),
)
_values = st.recursive(
    _leaves,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.tuples(inner, inner),
        st.dictionaries(
            st.sampled_from(["inputs", "targets", "x", "input_ids"]), inner, max_size=3
        ),
    ),
    max_leaves=8,
)
_probes = st.one_of(
    st.dictionaries(st.sampled_from(["inputs", "targets", "extra"]), _values, max_size=3),
    _values,
)


@FUZZ
@given(obj=_probes)
def test_random_probe_objects(tmp_path: Path, obj: object) -> None:
    path = tmp_path / "probe.pt"
    torch.save(obj, path)
    try:
        inputs, targets = load_probe(str(path))
    except ConfigError as exc:
        assert str(exc).startswith("probe file ")
        return
    assert inputs is not None and targets is not None


@FUZZ
@given(data=damaged(_torch_bytes(dict(zip(("inputs", "targets"), mlp_probe(), strict=True)))))
def test_damaged_probe_files(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "probe.pt"
    path.write_bytes(data)
    try:
        load_probe(str(path))
    except ConfigError as exc:
        assert "probe.pt" in str(exc)


def test_a_zip_record_claiming_a_version_zipfile_lacks_is_a_damaged_file(tmp_path: Path) -> None:
    """A central-directory record whose "version needed to extract" is 6.4 (zipfile
    raises NotImplementedError on it, found by the fuzz test above): a reason from the
    completeness check and a CheckpointError naming the file, never a raw exception."""
    from ddsmon.checkpoints import CheckpointRef, check_complete

    data = bytearray(VALID_TORCH)
    record = data.index(b"PK\x01\x02")
    data[record + 6 : record + 8] = (64).to_bytes(2, "little")  # version needed: 6.4
    path = tmp_path / "odd.pt"
    path.write_bytes(bytes(data))
    reason = check_complete(CheckpointRef(path, "torch"))
    assert reason is None or isinstance(reason, str)
    try:
        load_checkpoint(Ref(path, "torch"), mlp)
    except CheckpointError as exc:
        assert "odd.pt" in str(exc)
