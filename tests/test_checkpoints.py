"""Checkpoint recognition, step from name, completeness and fingerprints on real files."""

from __future__ import annotations

import io
import json
import os
import pickle
import struct
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from ddsmon.checkpoints import (
    CheckpointRef,
    RefusedFile,
    check_complete,
    checkpoint_for,
    classify,
    discover,
    excluded,
    fingerprint,
    is_temporary,
    open_regular,
    read_regular,
    stat_regular,
    step_from_name,
)
from ddsmon.errors import ConfigError


def torch_bytes(n: int = 4) -> bytes:
    buf = io.BytesIO()
    torch.save({"state_dict": {"w": torch.randn(n, n)}, "step": 3}, buf)
    return buf.getvalue()


def safetensors_bytes(tmp_path: Path) -> bytes:
    path = tmp_path / "_src.safetensors"
    save_file({"a.weight": torch.randn(3, 5), "b.bias": torch.randn(7)}, str(path))
    data = path.read_bytes()
    path.unlink()
    return data


def write(path: Path, data: bytes | str = b"") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        path.write_text(data)
    else:
        path.write_bytes(data)
    return path


def hf_folder(root: Path, step: int, *, state: bool = True, weights: bool = True) -> Path:
    folder = root / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    write(folder / "config.json", json.dumps({"model_type": "toy"}))
    if weights:
        save_file({"w": torch.randn(2, 2)}, str(folder / "model.safetensors"))
    write(folder / "optimizer.pt", torch_bytes())
    if state:
        write(folder / "trainer_state.json", json.dumps({"global_step": step}))
    return folder


def steps_found(root: Path) -> dict[str, int | None]:
    """What discover finds under ``root``: each checkpoint's path below it, with the step
    its name gives."""
    return {str(r.path.relative_to(root)): r.name_step for r in discover(root)}


def dcp_folder(path: Path) -> Path:
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():  # "assuming the intent is to save in a single process"
        warnings.simplefilter("ignore")
        dcp.save({"w": torch.randn(4, 4)}, checkpoint_id=str(path))
    return path


# --------------------------------------------------------------------------- names


@pytest.mark.parametrize(
    ("name", "step"),
    [
        ("step_00420.pt", 420),
        ("checkpoint-500", 500),
        ("epoch=3-step=1200.ckpt", 1200),
        ("epoch=3-step=1200-v1.ckpt", 1200),
        ("global_step800", 800),
        ("model_epoch5_step100.pt", 100),
        ("ckpt_7.pth", 7),
        ("run2_iter_30.safetensors", 30),
        ("last.ckpt", None),
        ("last-v1.ckpt", None),
        ("model.safetensors", None),
        ("weights.bin", None),
        ("mp_rank_00_model_states.pt", None),  # a rank is no step
        ("rank3.pt", None),
        ("ema_rank1_500.pt", 500),
        ("frank_3.pt", 3),
        ("model-00001-of-00002.safetensors", None),  # nor a shard count
        # nor a metric's value in Lightning's name=value pairs; an epoch orders as steps
        ("sample-epoch=05-val_loss=1.35.ckpt", 5),
        ("epoch=3-step=1200-val_loss=0.61.ckpt", 1200),
        ("best_val_acc=0.95_12.ckpt", 12),
        ("val_loss=0.25.ckpt", None),
        ("epoch=2-acc=98.ckpt", 2),
        # a pair is judged by the last "_" part of its name; only that part goes
        ("model_epoch=3.ckpt", 3),
        ("ckpt_iter=1200.pt", 1200),
        ("run1_epoch=05-val_loss=1.35.ckpt", 5),
        ("ckpt_500_loss=0.25.pt", 500),
        ("epoch=3-top1=0.92.ckpt", 3),
    ],
)
def test_step_from_name(name: str, step: int | None) -> None:
    assert step_from_name(Path("/x/run3") / name) == step
    assert CheckpointRef(Path(name), "torch").name_step == step


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("step_1.pt", "torch"),
        ("step_1.PTH", "torch"),
        ("pytorch_model.bin", "torch"),
        ("epoch=0-step=10.ckpt", "lightning"),
        ("model.safetensors", "safetensors"),
        ("step_1.pt.tmp", None),
        ("step_1.tmp.pt", None),
        ("step_1.pt.partial", None),
        ("step_1.pt.part", None),
        ("step_1.pt~", None),
        (".step_1.pt", None),
        ("notes.txt", None),
        ("model.onnx", None),
        ("training_args.bin", None),
        ("optimizer.pt", None),
        ("rng_state_3.pth", None),
    ],
)
def test_classify_files_by_name(tmp_path: Path, name: str, kind: str | None) -> None:
    path = write(tmp_path / name, torch_bytes())
    for root in (None, tmp_path):
        ref = classify(path, root)
        assert (ref.kind if ref else None) == kind
        if ref is not None:
            assert ref.path == path
    # a file need not exist to be classified (a vanished path still has a kind)
    path.unlink()
    ref = classify(path, tmp_path)
    assert (ref.kind if ref else None) == kind


def test_temporary_names() -> None:
    assert is_temporary(".ddsmon") and is_temporary("tmp-checkpoint-5") and is_temporary("x.tmp")
    assert not is_temporary("checkpoint-5") and not is_temporary("step_1.pt")
    assert not is_temporary("lr_0.001.pt")


def test_classify_folders(tmp_path: Path) -> None:
    hf = hf_folder(tmp_path, 20)
    assert classify(hf, tmp_path) == CheckpointRef(hf, "hf")
    dcp = dcp_folder(tmp_path / "step_30")
    assert classify(dcp, tmp_path) == CheckpointRef(dcp, "dcp")
    # a DCP save in a folder that happens to be named like an HF one is a DCP folder
    named = dcp_folder(tmp_path / "checkpoint-40")
    assert classify(named, tmp_path).kind == "dcp"
    plain = tmp_path / "run1"
    plain.mkdir()
    assert classify(plain, tmp_path) is None
    assert classify(write(tmp_path / "checkpoint-50", b"x"), tmp_path) is None  # a file
    assert classify(tmp_path / "checkpoint-60", tmp_path) is None  # folder kinds must exist
    tmp = tmp_path / "tmp-checkpoint-70"
    tmp.mkdir()
    assert classify(tmp, tmp_path) is None


def test_files_inside_folders_are_not_checkpoints(tmp_path: Path) -> None:
    hf = hf_folder(tmp_path, 10)
    dcp = dcp_folder(tmp_path / "dist")
    inner = [
        hf / "model.safetensors",
        hf / "optimizer.pt",
        write(hf / "pytorch_model.bin", torch_bytes()),
        write(hf / "global_step10" / "mp_rank_00_model_states.pt", torch_bytes()),
        write(dcp / "extra.pt", torch_bytes()),
        write(tmp_path / ".ddsmon" / "step_5.pt", torch_bytes()),
        write(tmp_path / "tmp-checkpoint-20" / "model.safetensors", b"x"),
        write(tmp_path / "run.tmp" / "step_1.pt", torch_bytes()),
    ]
    for path in inner:
        assert classify(path, tmp_path) is None, path
    # without a root only the immediate folder counts
    assert classify(hf / "model.safetensors") is None
    assert classify(write(tmp_path / ".cache" / "step_1.pt", torch_bytes())).kind == "torch"
    # the checkpoint a changed file belongs to
    assert checkpoint_for(hf / "trainer_state.json", tmp_path) == CheckpointRef(hf, "hf")
    assert checkpoint_for(hf / "global_step10" / "x.pt", tmp_path) == CheckpointRef(hf, "hf")
    assert checkpoint_for(dcp / ".metadata", tmp_path) == CheckpointRef(dcp, "dcp")
    assert checkpoint_for(tmp_path / ".ddsmon" / "step_5.pt", tmp_path) is None
    assert checkpoint_for(tmp_path / "a.pt", tmp_path / "elsewhere") is None
    sub = write(tmp_path / "run1" / "step_1.pt", torch_bytes())
    assert checkpoint_for(sub, tmp_path) == CheckpointRef(sub, "torch")
    deep = write(tmp_path / "a" / "b" / "step_1.pt", torch_bytes())
    assert checkpoint_for(deep, tmp_path) is None


def test_symlink_alias_inside_root_is_skipped(tmp_path: Path) -> None:
    target = write(tmp_path / "epoch=1-step=100.ckpt", torch_bytes())
    (tmp_path / "last.ckpt").symlink_to(target.name)
    outside = write(tmp_path.parent / f"{tmp_path.name}_other" / "step_9.pt", torch_bytes())
    (tmp_path / "linked_step_9.pt").symlink_to(outside)
    assert [r.path.name for r in discover(tmp_path)] == ["linked_step_9.pt", target.name]


def test_discover_sorts_by_step_then_name(tmp_path: Path) -> None:
    for name in ["step_10.pt", "step_2.pt", "b.safetensors", "a.pt", "step_2.ckpt"]:
        write(tmp_path / name, torch_bytes())
    hf_folder(tmp_path, 5)
    write(tmp_path / "run1" / "step_3.pt", torch_bytes())
    hf_folder(tmp_path / "run1", 7)
    write(tmp_path / "run1" / "deeper" / "step_1.pt", torch_bytes())  # two levels down
    write(tmp_path / "step_4.pt.tmp", torch_bytes())
    write(tmp_path / ".ddsmon" / "step_0.pt", torch_bytes())
    write(tmp_path / "notes.txt", "hello")
    found = [(str(r.path.relative_to(tmp_path)), r.kind) for r in discover(tmp_path)]
    assert found == [
        ("step_2.ckpt", "lightning"),
        ("step_2.pt", "torch"),
        ("run1/step_3.pt", "torch"),
        ("checkpoint-5", "hf"),
        ("run1/checkpoint-7", "hf"),
        ("step_10.pt", "torch"),
        ("a.pt", "torch"),
        ("b.safetensors", "safetensors"),
    ]


def test_discover_orders_lightning_names_by_epoch_and_step_not_by_a_metric(
    tmp_path: Path,
) -> None:
    # ModelCheckpoint(filename="sample-{epoch:02d}-{val_loss:.2f}"), the loss falling:
    # the names' last integers (the loss's digits) run backwards
    for epoch, loss in [(0, "1.99"), (1, "1.50"), (2, "1.35"), (10, "0.20")]:
        write(tmp_path / f"sample-epoch={epoch:02d}-val_loss={loss}.ckpt", torch_bytes())
    # "{epoch}-{step}-{val/loss:.3f}": the "/" in the metric's name makes a folder
    for epoch, step, loss in [(0, 4, "1.377"), (1, 8, "1.201"), (10, 44, "0.950")]:
        write(tmp_path / f"epoch={epoch}-step={step}-val" / f"loss={loss}.ckpt", torch_bytes())
    found = [(str(r.path.relative_to(tmp_path)), r.name_step) for r in discover(tmp_path)]
    assert found == [
        ("sample-epoch=00-val_loss=1.99.ckpt", 0),
        ("sample-epoch=01-val_loss=1.50.ckpt", 1),
        ("sample-epoch=02-val_loss=1.35.ckpt", 2),
        ("epoch=0-step=4-val/loss=1.377.ckpt", 4),
        ("epoch=1-step=8-val/loss=1.201.ckpt", 8),
        ("sample-epoch=10-val_loss=0.20.ckpt", 10),
        ("epoch=10-step=44-val/loss=0.950.ckpt", 44),
    ]
    # a file with a number of its own keeps it in a folder with a step tag
    ref = classify(write(tmp_path / "run_step5" / "ckpt_100.pt", torch_bytes()), tmp_path)
    assert ref is not None and ref.name_step == 100


def test_excluded_matches_the_path_below_the_root_or_the_name(tmp_path: Path) -> None:
    root = tmp_path / "ckpts"
    assert excluded(root / "ema_step10.pt", root, ["ema_*"])
    assert excluded(root / "run1" / "ema_step10.pt", root, ["ema_*"])  # by its name
    assert excluded(root / "run1" / "step_10.pt", root, ["run1/*"])  # by its path
    assert excluded(root / "checkpoint-500", root, ["checkpoint-*"])
    assert not excluded(root / "model_ema.pt", root, ["ema_*"])
    assert not excluded(root / "EMA_1.pt", root, ["ema_*"])  # case counts
    assert not excluded(root / "ema_1.pt", root, [])
    for name in ["model_step10.pt", "ema_step10.pt", "model_step20.pt", "ema_step20.pt"]:
        write(root / name, torch_bytes())
    assert [r.path.name for r in discover(root, exclude=("ema_*",))] == [
        "model_step10.pt",
        "model_step20.pt",
    ]


def test_discover_missing_directory_names_it(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="nope"):
        discover(tmp_path / "nope")
    assert discover(tmp_path) == []


# --------------------------------------------------------------------------- completeness


def test_torch_zip_complete_and_every_prefix_incomplete(tmp_path: Path) -> None:
    data = torch_bytes()
    path = write(tmp_path / "step_1.pt", data)
    ref = CheckpointRef(path, "torch")
    assert check_complete(ref) is None
    assert check_complete(CheckpointRef(path, "lightning")) is None
    for cut in range(len(data)):
        path.write_bytes(data[:cut])
        reason = check_complete(ref)
        assert reason is not None, f"prefix of {cut}/{len(data)} bytes passed as complete"
    path.write_bytes(b"")
    assert check_complete(ref) == "empty file (0 bytes)"
    path.write_bytes(data[: len(data) // 2])
    assert "end-of-central-directory" in check_complete(ref)


@pytest.mark.parametrize("protocol", [2, 4])
def test_a_legacy_torch_file_is_complete_only_whole(tmp_path: Path, protocol: int) -> None:
    """torch's legacy format (``_use_new_zipfile_serialization=False``): five pickles,
    then the storages; every prefix is incomplete, the whole file complete, and a file
    with bytes after its storages is not taken for one (``legacy_torch_problem``)."""
    path = tmp_path / "legacy.pt"
    state = {"a": torch.ones(3), "b": torch.arange(5), "h": torch.zeros(2, dtype=torch.half)}
    state["view"] = state["a"][1:]  # shares a's storage
    torch.save(state, path, _use_new_zipfile_serialization=False, pickle_protocol=protocol)
    data = path.read_bytes()
    ref = CheckpointRef(path, "torch")
    assert check_complete(ref) is None
    if protocol == 2:  # what torch.load's weights_only unpickler reads
        assert torch.equal(torch.load(path, weights_only=True)["b"], state["b"])
    for cut in sorted({1, 4, 15, 30, len(data) // 2, len(data) - 8, len(data) - 1}):
        path.write_bytes(data[:cut])
        reason = check_complete(ref)
        assert reason is not None and "legacy" in reason, (cut, reason)
    path.write_bytes(data + b"\0" * 8)
    assert "storages end at" in (check_complete(ref) or "")
    path.write_bytes(pickle.dumps({"not": "torch"}, protocol=2))
    assert "not torch's legacy format" in (check_complete(ref) or "")


def test_walking_a_hostile_legacy_pickle_is_bounded_and_never_raises(tmp_path: Path) -> None:
    """A 10-byte pickle whose PUT names index 2**24: the C unpickler's memo grows to
    twice the index (256 MiB here, 64 GiB at 2**32); walked with a dict memo it costs
    nothing. A key list holding a list (unhashable) is a reason, not a TypeError."""
    bomb = tmp_path / "bomb.pt"
    bomb.write_bytes(b"\x80\x02K\x01r" + struct.pack("<I", 2**24) + b".")
    script = (
        "import resource, sys; from pathlib import Path; "
        "from ddsmon.checkpoints import CheckpointRef, check_complete; "
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss; "
        "print(check_complete(CheckpointRef(Path(sys.argv[1]), 'torch'))); "
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)"
    )
    done = subprocess.run([sys.executable, "-c", script, str(bomb)], capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    reason, grew_kib = done.stdout.splitlines()
    assert reason.startswith("not a torch file"), reason
    assert int(grew_kib) < 64 * 1024, grew_kib
    magic = pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2)
    head = magic + b"".join(pickle.dumps(o, protocol=2) for o in (1001, {}, {}))
    damaged = tmp_path / "damaged.pt"
    damaged.write_bytes(head + pickle.dumps([[1]], protocol=2) + b"\0" * 8)
    assert "without its list of storages" in (check_complete(CheckpointRef(damaged, "torch")) or "")


def test_torch_non_zip_and_foreign_zip(tmp_path: Path) -> None:
    legacy = tmp_path / "legacy.pt"
    torch.save({"w": torch.ones(2)}, legacy, _use_new_zipfile_serialization=False)
    assert check_complete(CheckpointRef(legacy, "torch")) is None
    noise = tmp_path / "vocab.bin"
    noise.write_bytes(b"hello tokenizer " * 64)
    assert check_complete(CheckpointRef(noise, "torch")) == (
        "not a torch file (neither a zip archive nor torch's legacy format)"
    )
    import zipfile

    foreign = tmp_path / "foreign.pt"
    with zipfile.ZipFile(foreign, "w") as zf:
        zf.writestr("hello.txt", "hi")
    assert "data.pkl" in check_complete(CheckpointRef(foreign, "torch"))


def test_safetensors_complete_and_every_prefix_incomplete(tmp_path: Path) -> None:
    data = safetensors_bytes(tmp_path)
    path = write(tmp_path / "model.safetensors", data)
    ref = CheckpointRef(path, "safetensors")
    assert check_complete(ref) is None
    for cut in range(len(data)):
        path.write_bytes(data[:cut])
        assert check_complete(ref) is not None, f"prefix of {cut} bytes passed"
    path.write_bytes(data[:-1])
    assert "truncated" in check_complete(ref)
    path.write_bytes(data + b"\0")
    assert "trailing" in check_complete(ref)
    path.write_bytes(b"")
    assert check_complete(ref) == "empty file (0 bytes)"


def test_safetensors_bad_headers(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    ref = CheckpointRef(path, "safetensors")
    path.write_bytes(struct.pack("<Q", 4) + b"{no}")
    assert check_complete(ref) == "header is not valid JSON"
    path.write_bytes(struct.pack("<Q", 2) + b"[]")
    assert check_complete(ref) == "header is not a JSON object"
    path.write_bytes(struct.pack("<Q", 2**40) + b"{}")
    assert "implausible" in check_complete(ref)
    header = json.dumps({"t": {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}}).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 4)
    assert "'t'" in check_complete(ref)
    path.write_bytes(b"abc")
    assert "shorter than the 8-byte" in check_complete(ref)


def test_hf_folder_completeness(tmp_path: Path) -> None:
    folder = hf_folder(tmp_path, 3, state=False)
    ref = CheckpointRef(folder, "hf")
    assert check_complete(ref) == "no trainer_state.json yet"
    write(folder / "trainer_state.json", '{"global_step": ')
    assert "trainer_state.json is not valid JSON" in check_complete(ref)
    write(folder / "trainer_state.json", '{"global_step": 3}')
    assert check_complete(ref) is None
    weights = folder / "model.safetensors"
    full = weights.read_bytes()
    weights.write_bytes(full[:-3])
    assert check_complete(ref).startswith("model.safetensors: ")
    weights.unlink()
    assert "no weights file" in check_complete(ref)
    # a bin weights file is checked as a torch zip
    write(folder / "pytorch_model.bin", torch_bytes()[:100])
    assert check_complete(ref).startswith("pytorch_model.bin: ")
    write(folder / "pytorch_model.bin", torch_bytes())
    assert check_complete(ref) is None


def test_hf_sharded_weights(tmp_path: Path) -> None:
    folder = hf_folder(tmp_path, 4, weights=False)
    ref = CheckpointRef(folder, "hf")
    index = {
        "weight_map": {
            "a": "model-00001-of-00002.safetensors",
            "b": "model-00002-of-00002.safetensors",
        }
    }
    write(folder / "model.safetensors.index.json", json.dumps(index))
    save_file({"a": torch.ones(2)}, str(folder / "model-00001-of-00002.safetensors"))
    assert "model-00002-of-00002.safetensors" in check_complete(ref)
    save_file({"b": torch.ones(2)}, str(folder / "model-00002-of-00002.safetensors"))
    assert check_complete(ref) is None
    index["weight_map"]["c"] = "../escape.safetensors"
    write(folder / "model.safetensors.index.json", json.dumps(index))
    assert "outside the folder" in check_complete(ref)


def test_save_pretrained_folders_of_any_name_are_hf_checkpoints(tmp_path: Path) -> None:
    """What ``save_pretrained`` writes (config.json beside a weights file), under any
    name: an hf checkpoint stepped by its name, its files part of it; complete without a
    trainer_state.json once config.json parses and the weights are whole."""
    folder = tmp_path / "step_500"
    write(folder / "config.json", json.dumps({"model_type": "toy"}))
    assert classify(folder, tmp_path) is None  # config.json alone: not yet
    save_file({"w": torch.randn(2, 2)}, str(folder / "model.safetensors"))
    ref = classify(folder, tmp_path)
    assert ref == CheckpointRef(folder, "hf") and ref.name_step == 500
    assert classify(folder / "model.safetensors", tmp_path) is None
    assert checkpoint_for(folder / "model.safetensors", tmp_path) == ref
    assert [r.path for r in discover(tmp_path)] == [folder]
    assert check_complete(ref) is None
    write(folder / "config.json", '{"model_type": ')
    assert check_complete(ref).startswith("config.json: ")
    write(folder / "config.json", json.dumps({"model_type": "toy"}))
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-3])
    assert check_complete(ref).startswith("model.safetensors: ")
    # named without a step: still a checkpoint, with no step from its name
    final = tmp_path / "final"
    write(final / "config.json", "{}")
    write(final / "pytorch_model.bin", torch_bytes())
    assert classify(final, tmp_path) == CheckpointRef(final, "hf")
    assert classify(final, tmp_path).name_step is None
    assert check_complete(CheckpointRef(final, "hf")) is None
    # a Trainer folder still waits for trainer_state.json, written last
    trainer = hf_folder(tmp_path, 7, state=False)
    assert check_complete(CheckpointRef(trainer, "hf")) == "no trainer_state.json yet"
    # save_pretrained into a checkpoint-N name: no Trainer files, so nothing to wait for
    named = tmp_path / "checkpoint-100"
    write(named / "config.json", "{}")
    save_file({"w": torch.randn(2, 2)}, str(named / "model.safetensors"))
    assert check_complete(CheckpointRef(named, "hf")) is None
    write(named / "training_args.bin", torch_bytes())  # the Trainer's, mid-save
    assert check_complete(CheckpointRef(named, "hf")) == "no trainer_state.json yet"


def test_files_in_a_stepped_folder_take_its_step(tmp_path: Path) -> None:
    """Accelerate's ``save_state`` layout (``checkpoint_<i>/model.safetensors`` beside
    optimizer.bin, scheduler.bin, random_states_0.pkl) and ``step_N/model.pt``: the
    weights file is the checkpoint, at the folder's step; the side files are not
    checkpoints; a bare number in the file's own name is a model's index, not a step
    (``iter-50/model_1.safetensors`` is step 50); a folder whose name is no step gives
    none (``run1/best.pt``)."""
    for i in (0, 1, 12):
        folder = tmp_path / f"checkpoint_{i}"
        save_file({"w": torch.randn(2, 2)}, str(write(folder / "model.safetensors")))
        for side in ("optimizer.bin", "scheduler.bin", "sampler.bin", "optimizer_1.bin",
                     "dl_state_dict.bin"):  # fmt: skip
            write(folder / side, torch_bytes())
        write(folder / "random_states_0.pkl", b"x")
    write(tmp_path / "step_40" / "model.pt", torch_bytes())
    save_file({"w": torch.randn(2, 2)}, str(write(tmp_path / "iter-50" / "model_1.safetensors")))
    write(tmp_path / "run1" / "best.pt", torch_bytes())
    assert steps_found(tmp_path) == {
        "checkpoint_0/model.safetensors": 0,
        "checkpoint_1/model.safetensors": 1,
        "checkpoint_12/model.safetensors": 12,
        "step_40/model.pt": 40,
        "iter-50/model_1.safetensors": 50,
        "run1/best.pt": None,
    }
    # the folder's step is no part of the ref's identity, and report (no root) sees it too
    inner = tmp_path / "step_40" / "model.pt"
    assert classify(inner, tmp_path) == classify(inner) == CheckpointRef(inner, "torch")
    assert classify(inner).name_step == 40
    # files directly in the watched directory never take the directory's name
    assert classify(write(tmp_path / "model.pt", torch_bytes()), tmp_path).name_step is None


def test_deepspeed_folders_take_the_folder_step_and_skip_optimizer_partitions(
    tmp_path: Path,
) -> None:
    """DeepSpeed's ``save_checkpoint`` layout: ``global_step<N>/`` holding
    ``mp_rank_00_model_states.pt`` (the model) and ``*optim_states.pt`` partitions, a
    ``latest`` file beside the folders. The model file is step N (its ``00`` is a rank),
    the partitions are not checkpoints; a step tag in the file's own name still wins."""
    for step in (100, 200):
        folder = tmp_path / f"global_step{step}"
        write(folder / "mp_rank_00_model_states.pt", torch_bytes())
        write(folder / "zero_pp_rank_0_mp_rank_00_optim_states.pt", torch_bytes())
        write(folder / "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt", torch_bytes())
        write(folder / "zero_pp_rank_0_mp_rank_00_model_states.pt", torch_bytes())  # ZeRO-3
        write(folder / "layer_01-model_00-model_states.pt", torch_bytes())  # pipeline
    write(tmp_path / "latest", "global_step200")
    write(tmp_path / "step_300" / "ema_step_310.pt", torch_bytes())
    assert steps_found(tmp_path) == {
        "global_step100/mp_rank_00_model_states.pt": 100,
        "global_step200/mp_rank_00_model_states.pt": 200,
        "step_300/ema_step_310.pt": 310,
    }


def test_a_pretrained_model_named_with_numbers_gets_no_step_from_them(tmp_path: Path) -> None:
    """A save_pretrained folder takes a step only from a step-shaped name: a base model
    kept beside the checkpoints (``Llama-3.2-1B/``) is unstepped, never step 1."""
    for name, step in [("Llama-3.2-1B", None), ("Qwen2.5-0.5B", None), ("model_v2", None),
                       ("step_500", 500), ("global_step800", 800), ("ckpt-3", 3),
                       ("run_step_90", 90)]:  # fmt: skip
        folder = tmp_path / name
        write(folder / "config.json", "{}")
        save_file({"w": torch.randn(2, 2)}, str(folder / "model.safetensors"))
        ref = classify(folder, tmp_path)
        assert ref is not None and ref.kind == "hf" and ref.name_step == step, name


def test_a_folder_holding_checkpoints_is_not_a_pretrained_checkpoint(tmp_path: Path) -> None:
    """A Trainer's output_dir (checkpoint-N/ folders beside the final model's config.json
    and weights) and a custom loop's folder (step_N.pt beside a config.json and a
    model.safetensors) are folders of checkpoints, not one save_pretrained checkpoint."""
    run = tmp_path / "run"
    hf_folder(run, 500)
    hf_folder(run, 1000)
    write(run / "config.json", "{}")
    save_file({"w": torch.randn(2, 2)}, str(run / "model.safetensors"))
    write(run / "training_args.bin", torch_bytes())
    assert classify(run, tmp_path) is None
    found = sorted(str(r.path.relative_to(tmp_path)) for r in discover(tmp_path))
    assert found == ["run/checkpoint-1000", "run/checkpoint-500", "run/model.safetensors"]
    assert checkpoint_for(run / "checkpoint-500" / "trainer_state.json", tmp_path).kind == "hf"
    loop = tmp_path / "loop"
    write(loop / "config.json", "{}")
    save_file({"w": torch.randn(2, 2)}, str(loop / "model.safetensors"))
    write(loop / "step_10.pt", torch_bytes())
    assert classify(loop, tmp_path) is None
    assert classify(loop / "step_10.pt", tmp_path) == CheckpointRef(loop / "step_10.pt", "torch")


def test_shards_written_before_their_index_wait_for_it(tmp_path: Path) -> None:
    """save_pretrained writes a sharded model's shards, then the index: until it lands
    the folder is incomplete, and a shard is never a checkpoint of its own."""
    folder = tmp_path / "final"
    write(folder / "config.json", "{}")
    names = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    save_file({"a": torch.ones(2)}, str(folder / names[0]))
    assert classify(folder / names[0], tmp_path) is None
    assert checkpoint_for(folder / names[0], tmp_path) == CheckpointRef(folder, "hf")
    save_file({"b": torch.ones(2)}, str(folder / names[1]))
    ref = classify(folder, tmp_path)
    assert check_complete(ref) == "weight shards without their index yet (still being written)"
    index = {"weight_map": {"a": names[0], "b": names[1]}}
    write(folder / "model.safetensors.index.json", json.dumps(index))
    assert check_complete(ref) is None
    # outside a folder a shard is still no checkpoint
    loose = write(tmp_path / "pytorch_model-00001-of-00003.bin", torch_bytes())
    assert classify(loose, tmp_path) is None


def test_where_checkpoints_are_when_none_is_found(tmp_path: Path) -> None:
    """Nothing where discover looks: one level deeper (Accelerate's project_dir holds
    checkpoints/checkpoint_<i>/) is named; ZeRO-3 partitions alone are said to hold no
    whole weights; an empty directory says nothing."""
    from ddsmon.checkpoints import where_checkpoints_are

    assert where_checkpoints_are(tmp_path) is None
    project = tmp_path / "project"
    for i in (0, 1):
        save_file({"w": torch.ones(2)}, str(write(project / "checkpoints" / f"checkpoint_{i}" / "model.safetensors")))  # fmt: skip
    assert discover(project) == []
    said = where_checkpoints_are(project)
    assert said is not None and f"watch {project / 'checkpoints'} instead" in said
    assert where_checkpoints_are(project / "checkpoints") is None  # found there: nothing to say
    ds = tmp_path / "ds"
    write(ds / "global_step10" / "zero_pp_rank_0_mp_rank_00_model_states.pt", torch_bytes())
    write(ds / "global_step10" / "zero_pp_rank_0_mp_rank_00_optim_states.pt", torch_bytes())
    assert discover(ds) == []
    said = where_checkpoints_are(ds)
    assert said is not None and "ZeRO-3" in said and "zero_to_fp32.py" in said


def test_dcp_folder_completeness(tmp_path: Path) -> None:
    folder = dcp_folder(tmp_path / "dist")
    ref = CheckpointRef(folder, "dcp")
    assert check_complete(ref) is None
    metadata = folder / ".metadata"
    metadata.write_bytes(b"")
    assert ".metadata is empty" in check_complete(ref)
    metadata.unlink()
    assert check_complete(ref) == "no .metadata yet (still being written)"


def test_missing_checkpoints_are_reasons_not_errors(tmp_path: Path) -> None:
    for kind in ("torch", "lightning", "safetensors", "hf", "dcp"):
        reason = check_complete(CheckpointRef(tmp_path / "gone", kind))  # type: ignore[arg-type]
        assert reason is not None and "vanished" in reason, (kind, reason)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.binary(max_size=300), kind=st.sampled_from(["torch", "safetensors"]))
def test_check_complete_never_raises_on_garbage(tmp_path: Path, data: bytes, kind: str) -> None:
    path = tmp_path / f"fuzz.{'pt' if kind == 'torch' else 'safetensors'}"
    path.write_bytes(b"PK\x03\x04" + data if data[:1] == b"\0" else data)
    reason = check_complete(CheckpointRef(path, kind))  # type: ignore[arg-type]
    assert reason is None or isinstance(reason, str)
    assert reason is not None or kind == "safetensors"  # random bytes are never a torch file


# --------------------------------------------------------------------------- fingerprints


def test_fingerprint_file_and_folder(tmp_path: Path) -> None:
    path = write(tmp_path / "step_1.pt", torch_bytes())
    st_ = os.stat(path)
    assert fingerprint(CheckpointRef(path, "torch")) == (st_.st_size, st_.st_mtime_ns)
    folder = hf_folder(tmp_path, 8)
    ref = CheckpointRef(folder, "hf")
    files = [p for p in folder.rglob("*") if p.is_file()]
    size, mtime = fingerprint(ref)
    assert size == sum(p.stat().st_size for p in files)
    assert mtime == max(p.stat().st_mtime_ns for p in [folder, *folder.rglob("*")])
    os.utime(folder / "config.json", ns=(mtime + 10**9, mtime + 10**9))
    assert fingerprint(ref) == (size, mtime + 10**9)
    write(folder / "extra.txt", "12345")
    assert fingerprint(ref)[0] == size + 5
    with pytest.raises(FileNotFoundError):
        fingerprint(CheckpointRef(tmp_path / "gone.pt", "torch"))
    with pytest.raises(FileNotFoundError):
        fingerprint(CheckpointRef(tmp_path / "checkpoint-99", "hf"))


# --------------------------------------------------------------------------- regular files only


@pytest.mark.timeout(30)
def test_open_regular_refuses_what_is_not_a_regular_file(tmp_path: Path) -> None:
    (tmp_path / "ok").write_bytes(b"12345")
    with open_regular(tmp_path / "ok") as handle:
        assert handle.read() == b"12345"
    os.mkfifo(tmp_path / "fifo")  # no writer: a blocking open would wait for ever
    (tmp_path / "zero").symlink_to("/dev/zero")
    (tmp_path / "gone").symlink_to(tmp_path / "nowhere")
    (tmp_path / "dir").mkdir()
    reasons = {
        "fifo": "not a regular file (FIFO)",
        "zero": "not a regular file (character device, through the symbolic link to /dev/zero)",
        "gone": f"dangling symbolic link (to {str(tmp_path / 'nowhere')!r}, which does not exist)",
        "dir": "not a regular file (directory)",
    }
    for name, reason in reasons.items():
        for call in (open_regular, stat_regular, read_regular):
            with pytest.raises(RefusedFile) as info:
                call(tmp_path / name)
            assert info.value.reason == reason and info.value.path == tmp_path / name
    with pytest.raises(FileNotFoundError):
        open_regular(tmp_path / "missing")


def test_read_regular_is_bounded(tmp_path: Path) -> None:
    (tmp_path / "f.json").write_bytes(b"x" * 100)
    assert read_regular(tmp_path / "f.json", limit=100) == b"x" * 100
    with pytest.raises(RefusedFile, match=r"^100 bytes, more than the 99 bytes ddsmon reads"):
        read_regular(tmp_path / "f.json", limit=99)


@pytest.mark.timeout(30)
def test_dcp_folder_with_a_fifo_metadata_is_still_a_dcp_folder(tmp_path: Path) -> None:
    """Recognised (so the fault is reported), and its completeness check never blocks."""
    (tmp_path / "run").mkdir()
    os.mkfifo(tmp_path / "run" / ".metadata")
    ref = classify(tmp_path / "run", tmp_path)
    assert ref == CheckpointRef(tmp_path / "run", "dcp")
    assert check_complete(ref) == ".metadata: not a regular file (FIFO)"
    (tmp_path / "checkpoint-5").mkdir()
    os.mkfifo(tmp_path / "checkpoint-5" / "trainer_state.json")
    ref = CheckpointRef(tmp_path / "checkpoint-5", "hf")
    assert check_complete(ref) == "trainer_state.json: not a regular file (FIFO)"
    os.mkfifo(tmp_path / "step_1.pt")
    assert check_complete(CheckpointRef(tmp_path / "step_1.pt", "torch")) == (
        "not a regular file (FIFO)"
    )
