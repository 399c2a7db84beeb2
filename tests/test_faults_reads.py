"""Reads that never end, and files that are not files: each fault injected for real.

A FIFO (``os.mkfifo``), a symbolic link to ``/dev/zero``, a dangling symbolic link, a
directory, and a file the reader may not open (chmod 000, with the reader's
CAP_DAC_OVERRIDE dropped when the tests run as root) are put in place of every file a
checkpoint, a probe or a model factory is read from. The readers run in a child
process with a timeout and a 3 GiB data limit, so a reader that blocks or reads without
end fails the test rather than hanging it or exhausting the machine. Sparse files
(``os.truncate``) measure that a checkpoint whose tensors do not match the model is
refused before its tensor data is read.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import signal
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from fixtures_models import mlp, mlp_probe
from safetensors.torch import save_file
from test_loading import Ref, dcp_save, hf_folder, same_weights

from ddsmon.checkpoints import CheckpointRef, check_complete
from ddsmon.errors import CheckpointError
from ddsmon.loading import load_checkpoint
from ddsmon.sinks.mlflow_keys import CHECKPOINT_METRIC

REPO = Path(__file__).resolve().parents[1]
TESTS = REPO / "tests"
FACTORY = f"{TESTS / 'fixtures_models.py'}:mlp"
DATA_LIMIT = 3 << 30  # RLIMIT_DATA of the child: a read without end fails with MemoryError
CHILD_TIMEOUT = 120

pytestmark = pytest.mark.timeout(300)

# The child: runs each (label, op, path, kind) case and prints {label: outcome} as JSON.
# An outcome is "ok", None (check_complete found nothing wrong), the text of a ddsmon
# error, or "UNEXPECTED <type>: <text>" for anything else (a MemoryError, a raw OSError).
CHILD = r"""
import json, resource, sys
resource.setrlimit(resource.RLIMIT_DATA, ({limit}, {limit}))
sys.path[:0] = [{repo!r}, {tests!r}]
from dataclasses import dataclass
from pathlib import Path
from ddsmon.checkpoints import CheckpointRef, check_complete
from ddsmon.errors import DDSError
from ddsmon.loading import load_checkpoint, load_probe, resolve_factory
from fixtures_models import mlp

def run(op, path, kind):
    if op == "complete":
        return check_complete(CheckpointRef(Path(path), kind))
    if op == "load":
        load_checkpoint(CheckpointRef(Path(path), kind), mlp)
    elif op == "load-no-factory":
        load_checkpoint(CheckpointRef(Path(path), kind), None)
    elif op == "probe":
        load_probe(path)
    elif op == "factory":
        resolve_factory(path + ":mlp")()
    return "ok"

out = {{}}
for label, op, path, kind in json.loads(sys.argv[1]):
    try:
        out[label] = run(op, path, kind)
    except DDSError as exc:
        out[label] = str(exc)
    except BaseException as exc:
        out[label] = f"UNEXPECTED {{type(exc).__name__}}: {{exc}}"
print(json.dumps(out))
"""


def run_child(
    cases: list[tuple[str, str, str, str]], preexec: Callable[[], None] | None = None
) -> dict[str, str | None]:
    code = CHILD.format(limit=DATA_LIMIT, repo=str(REPO), tests=str(TESTS))
    result = subprocess.run(
        [sys.executable, "-c", code, json.dumps(cases)],
        capture_output=True,
        text=True,
        timeout=CHILD_TIMEOUT,  # a reader that blocks fails here
        preexec_fn=preexec,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- where a file is read


def build_positions(root: Path) -> dict[str, tuple[Path, Path, str, str]]:
    """Every place ddsmon reads a file from, each a valid checkpoint, probe or factory:
    ``label -> (file to replace, what is read, kind, how the load refers to it)``.
    The reference is "folder" for a file read as part of an hf/dcp folder."""
    sd = {k: v.contiguous() for k, v in mlp(seed=3).state_dict().items()}
    files = root / "files"
    files.mkdir()
    torch.save({"model": sd, "step": 1}, files / "step_1.pt")
    torch.save({"state_dict": {f"model.{k}": v for k, v in sd.items()}}, files / "e-step=2.ckpt")
    save_file(sd, files / "w.safetensors")
    x, y = mlp_probe()
    torch.save({"inputs": x, "targets": y}, files / "probe.pt")
    save_file({"inputs": x.contiguous(), "targets": y.contiguous()}, files / "probe.safetensors")
    (files / "model.py").write_text((TESTS / "fixtures_models.py").read_text())

    def hf(name: str, weights: str = "model.safetensors") -> Path:
        (root / name).mkdir()
        return hf_folder(root / name, mlp(seed=3), weights)

    def dcp(name: str) -> Path:
        dcp_save({"model": dict(sd), "step": 7}, root / name)
        return root / name

    hf_state, hf_st, hf_bin = hf("state"), hf("st"), hf("bin", "pytorch_model.bin")
    hf_index, hf_shard, hf_config = hf("index", "sharded"), hf("shard", "sharded"), hf("config")
    dcp_meta, dcp_data = dcp("dcp_meta"), dcp("dcp_data")
    data_files = sorted(p.name for p in dcp_data.iterdir() if p.suffix == ".distcp")
    assert data_files, "torch.distributed.checkpoint wrote no .distcp data file"
    return {
        "torch .pt": (files / "step_1.pt", files / "step_1.pt", "torch", "load"),
        "Lightning .ckpt": (files / "e-step=2.ckpt", files / "e-step=2.ckpt", "lightning", "load"),
        "safetensors": (files / "w.safetensors", files / "w.safetensors", "safetensors", "load"),
        "hf trainer_state.json": (hf_state / "trainer_state.json", hf_state, "hf", "load"),
        "hf model.safetensors": (hf_st / "model.safetensors", hf_st, "hf", "load"),
        "hf pytorch_model.bin": (hf_bin / "pytorch_model.bin", hf_bin, "hf", "load"),
        "hf shard index": (hf_index / "model.safetensors.index.json", hf_index, "hf", "load"),
        "hf shard": (hf_shard / "model-00002-of-00002.safetensors", hf_shard, "hf", "load"),
        "hf config.json": (hf_config / "config.json", hf_config, "hf", "load-no-factory"),
        "dcp .metadata": (dcp_meta / ".metadata", dcp_meta, "dcp", "load"),
        "dcp data file": (dcp_data / data_files[0], dcp_data, "dcp", "load"),
        "probe .pt": (files / "probe.pt", files / "probe.pt", "", "probe"),
        "probe .safetensors": (
            files / "probe.safetensors",
            files / "probe.safetensors",
            "",
            "probe",
        ),
        "factory .py": (files / "model.py", files / "model.py", "", "factory"),
    }


# What check_complete looks at (it does not read config.json nor DCP data files).
COMPLETENESS_READS = {
    "torch .pt",
    "Lightning .ckpt",
    "safetensors",
    "hf trainer_state.json",
    "hf model.safetensors",
    "hf pytorch_model.bin",
    "hf shard index",
    "hf shard",
    "dcp .metadata",
}


def cases_for(positions: dict[str, tuple[Path, Path, str, str]]) -> list[tuple[str, str, str, str]]:
    cases = []
    for label, (_, read, kind, op) in positions.items():
        cases.append((f"{label} / load", op, str(read), kind))
        if label in COMPLETENESS_READS:
            cases.append((f"{label} / complete", "complete", str(read), kind))
    return cases


def expected(label: str, target: Path, read: Path, op: str, reason: str) -> str:
    """The message a refused ``target`` gives: the file (or folder) it names and why."""
    if op == "probe":
        return f"probe file {str(read)!r}: {reason}"
    if op == "factory":
        return f"factory file {str(read)!r}: {reason}"
    if target == read:
        return f"{read}: {reason}"
    inner = f"data file {target.name}" if label == "dcp data file" else target.name
    return f"{read}: {inner}: {reason}"


def completeness_expected(label: str, target: Path, read: Path, reason: str) -> str:
    return reason if target == read else f"{target.name}: {reason}"


def check_all(
    positions: dict[str, tuple[Path, Path, str, str]],
    outcomes: dict[str, str | None],
    reason_of: Callable[[Path], str],
) -> None:
    problems = []
    for label, (target, read, _, op) in positions.items():
        reason = reason_of(target)
        want = expected(label, target, read, op, reason)
        got = outcomes[f"{label} / load"]
        if got != want:
            problems.append(f"{label} / load:\n    got  {got!r}\n    want {want!r}")
        if label in COMPLETENESS_READS:
            want = completeness_expected(label, target, read, reason)
            got = outcomes[f"{label} / complete"]
            if got != want:
                problems.append(f"{label} / complete:\n    got  {got!r}\n    want {want!r}")
    assert not problems, "\n".join(problems)


def replace(target: Path, make: Callable[[Path], None]) -> None:
    target.unlink()
    make(target)


# --------------------------------------------------------------------------- the faults


def test_fifo_in_place_of_any_file_is_refused_without_blocking(tmp_path: Path) -> None:
    positions = build_positions(tmp_path)
    for target, *_ in positions.values():
        replace(target, os.mkfifo)
    started = time.monotonic()
    outcomes = run_child(cases_for(positions))
    check_all(positions, outcomes, lambda _: "not a regular file (FIFO)")
    assert time.monotonic() - started < CHILD_TIMEOUT


def test_symlink_to_dev_zero_is_refused_before_a_byte_is_read(tmp_path: Path) -> None:
    positions = build_positions(tmp_path)
    for target, *_ in positions.values():
        replace(target, lambda p: p.symlink_to("/dev/zero"))
    outcomes = run_child(cases_for(positions))
    check_all(
        positions,
        outcomes,
        lambda _: "not a regular file (character device, through the symbolic link to /dev/zero)",
    )


def test_dangling_symlink_is_named_not_taken_for_a_vanished_file(tmp_path: Path) -> None:
    positions = build_positions(tmp_path)
    gone = tmp_path / "elsewhere" / "deleted"
    for target, *_ in positions.values():
        replace(target, lambda p: p.symlink_to(gone))
    outcomes = run_child(cases_for(positions))
    check_all(
        positions,
        outcomes,
        lambda _: f"dangling symbolic link (to {str(gone)!r}, which does not exist)",
    )


def test_directory_where_a_file_is_expected(tmp_path: Path) -> None:
    positions = build_positions(tmp_path)
    for target, *_ in positions.values():
        replace(target, lambda p: p.mkdir())
    # A probe path that is a directory keeps its own message.
    probe_dir = positions.pop("probe .pt")[0]
    positions.pop("probe .safetensors")
    outcomes = run_child([*cases_for(positions), ("probe dir", "probe", str(probe_dir), "")])
    check_all(positions, outcomes, lambda _: "not a regular file (directory)")
    assert outcomes["probe dir"] == (
        f"probe {str(probe_dir)!r} is a directory; expected a file holding "
        "{'inputs', 'targets'} or MODULE:FUNCTION"
    )


def _drop_dac_override() -> None:
    """In the child, before exec: drop CAP_DAC_OVERRIDE (1) and CAP_DAC_READ_SEARCH (2)
    from the bounding set, so root obeys file permissions like anyone else."""
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2):
        if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed")


def test_unreadable_file_is_reported_by_name(tmp_path: Path) -> None:
    """chmod 000. As root, file permissions do not bite unless the reader drops
    CAP_DAC_OVERRIDE; the child does, and the test is skipped where it cannot."""
    preexec = None
    if os.geteuid() == 0:
        probe = subprocess.run(
            [sys.executable, "-c", "open('/proc/self/status')"], preexec_fn=_drop_dac_override
        )
        if probe.returncode != 0:
            pytest.skip(
                "running as root and cannot drop CAP_DAC_OVERRIDE: chmod 000 would not bite"
            )
        preexec = _drop_dac_override
    positions = build_positions(tmp_path)
    for target, *_ in positions.values():
        target.chmod(0)
    # A factory file Python cannot open is reported by Python's loader, in its words.
    factory = positions.pop("factory .py")[1]
    outcomes = run_child(
        [*cases_for(positions), ("factory", "factory", str(factory), "")], preexec=preexec
    )
    check_all(positions, outcomes, lambda _: "permission denied (cannot be opened for reading)")
    assert re.fullmatch(
        rf"cannot load '{re.escape(str(factory))}' \(PermissionError: .*", str(outcomes["factory"])
    )


def test_symlink_loop_is_refused(tmp_path: Path) -> None:
    (tmp_path / "a.pt").symlink_to(tmp_path / "b.pt")
    (tmp_path / "b.pt").symlink_to(tmp_path / "a.pt")
    ref = CheckpointRef(tmp_path / "a.pt", "torch")
    assert check_complete(ref) == "a loop of symbolic links"
    with pytest.raises(CheckpointError, match=r"a\.pt: a loop of symbolic links$"):
        load_checkpoint(ref, mlp)


# --------------------------------------------------------------------------- bounded reads

MEASURE = r"""
import json, resource, sys
resource.setrlimit(resource.RLIMIT_DATA, ({limit}, {limit}))
sys.path[:0] = [{repo!r}, {tests!r}]
from pathlib import Path
from ddsmon.checkpoints import CheckpointRef
from ddsmon.errors import CheckpointError
from ddsmon.loading import load_checkpoint
from fixtures_models import mlp
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    load_checkpoint(CheckpointRef(Path(sys.argv[1]), sys.argv[2]), mlp)
    error = None
except CheckpointError as exc:
    error = str(exc)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({{"error": error, "grew_mib": (after - before) / 1024}}))
"""

GIB = 1 << 30


def sparse_safetensors(path: Path, nbytes: int = GIB) -> None:
    """A safetensors file of one F32 tensor of ``nbytes`` zeros, none of it on disk."""
    header = json.dumps(
        {"big": {"dtype": "F32", "shape": [nbytes // 4], "data_offsets": [0, nbytes]}}
    ).encode()
    header += b" " * (-len(header) % 8)
    path.write_bytes(len(header).to_bytes(8, "little") + header)
    os.truncate(path, 8 + len(header) + nbytes)


def sparse_torch_zip(path: Path, nbytes: int = GIB, *, flat: bool = False) -> None:
    """A torch.save zip of one ``nbytes`` tensor (``{"state_dict": {"big": ...}}``, or
    ``{"big": ...}`` when ``flat``) whose data record is a hole: written under skip_data
    (headers only), by a child so this process never holds the tensor."""
    big = f"{{'big': torch.empty({nbytes // 4})}}"
    obj = big if flat else f"{{'state_dict': {big}}}"
    code = (
        "import torch, sys\n"
        "with torch.serialization.skip_data():\n"
        f"    torch.save({obj}, sys.argv[1])\n"
    )
    subprocess.run([sys.executable, "-c", code, str(path)], check=True, timeout=CHILD_TIMEOUT)


def measure(path: Path, kind: str) -> dict:
    code = MEASURE.format(limit=DATA_LIMIT, repo=str(REPO), tests=str(TESTS))
    result = subprocess.run(
        [sys.executable, "-c", code, str(path), kind],
        capture_output=True,
        text=True,
        timeout=CHILD_TIMEOUT,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("where", ["safetensors", "torch", "hf safetensors", "hf bin"])
def test_mismatched_sparse_1gib_checkpoint_is_refused_before_its_data_is_read(
    tmp_path: Path, where: str
) -> None:
    if where.startswith("hf"):
        folder = hf_folder(tmp_path, mlp(), "model.safetensors")
        (folder / "model.safetensors").unlink()
        if where == "hf bin":
            sparse_torch_zip(folder / "pytorch_model.bin", flat=True)
        else:
            sparse_safetensors(folder / "model.safetensors")
        path, kind, big = folder, "hf", next(folder.glob("*model*"))
    else:
        path = tmp_path / ("big.safetensors" if where == "safetensors" else "big.pt")
        (sparse_safetensors if where == "safetensors" else sparse_torch_zip)(path)
        kind, big = where, path
    st = big.stat()
    assert st.st_size >= GIB
    if st.st_blocks * 512 > 64 << 20:
        pytest.skip("this filesystem does not keep the file sparse")
    outcome = measure(path, kind)
    assert outcome["error"] is not None
    assert "no key of the model in the checkpoint" in outcome["error"]
    assert "'big'" in outcome["error"]
    # Read whole, the 1 GiB would show in the peak RSS (2 GiB before the fix).
    assert outcome["grew_mib"] < 128, outcome


def test_matching_checkpoints_still_load_after_the_header_check(tmp_path: Path) -> None:
    """The key check before the data does not change what loads: every kind, same weights."""

    src = mlp(seed=4)
    sd = {k: v.contiguous() for k, v in src.state_dict().items()}
    save_file({**sd, "model.extra": torch.zeros(3)}, tmp_path / "w.safetensors")
    torch.save({"state_dict": sd, "optimizer": {"m": torch.ones(100)}}, tmp_path / "w.ckpt")
    (tmp_path / "a").mkdir()
    folder = hf_folder(tmp_path / "a", src, "sharded")
    with pytest.raises(CheckpointError, match=r"unexpected 1 key \('model\.extra'\)"):
        load_checkpoint(Ref(tmp_path / "w.safetensors", "safetensors"), mlp)
    save_file(sd, tmp_path / "w.safetensors")
    for ref in (
        Ref(tmp_path / "w.safetensors", "safetensors"),
        Ref(tmp_path / "w.ckpt", "lightning"),
        Ref(folder, "hf"),
    ):
        assert same_weights(load_checkpoint(ref, mlp).model, src), ref


def test_oversized_json_side_file_is_refused_with_its_size(tmp_path: Path) -> None:

    folder = hf_folder(tmp_path, mlp(), "model.safetensors")
    state = folder / "trainer_state.json"
    os.truncate(state, 65 << 20)  # sparse: 65 MiB of JSON, past the 64 MiB cap
    reason = f"{65 << 20} bytes, more than the 64 MiB ddsmon reads of such a file"
    assert check_complete(CheckpointRef(folder, "hf")) == f"trainer_state.json: {reason}"
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(CheckpointRef(folder, "hf"), mlp)
    assert str(info.value) == f"{folder}: trainer_state.json: {reason}"


def test_safetensors_header_past_the_cap_is_refused_unread(tmp_path: Path) -> None:
    path = tmp_path / "h.safetensors"
    n = 200_000_000  # over the 100 MB the safetensors library allows; the file is sparse
    path.write_bytes(n.to_bytes(8, "little"))
    os.truncate(path, 8 + n)
    ref = CheckpointRef(path, "safetensors")
    assert check_complete(ref) == f"header length {n} is implausible (not a safetensors file?)"
    with pytest.raises(CheckpointError, match=rf"header of {n} bytes, more than the 100000000"):
        load_checkpoint(ref, mlp)


def test_truncated_dcp_data_file_is_named_before_it_is_read(tmp_path: Path) -> None:
    dcp_save({"model": mlp().state_dict(), "step": 3}, tmp_path / "dcp")
    data = next((tmp_path / "dcp").glob("*.distcp"))
    size = data.stat().st_size
    os.truncate(data, size // 2)
    with pytest.raises(
        CheckpointError,
        match=rf"dcp: data file {data.name} has {size // 2} bytes, \.metadata says it holds "
        rf"\d+ \(truncated\)",
    ):
        load_checkpoint(CheckpointRef(tmp_path / "dcp", "dcp"), mlp)


def test_compressed_torch_zip_member_is_refused(tmp_path: Path) -> None:
    """torch.save stores; a deflated member would be inflated to whatever it declares."""

    torch.save({"model": mlp().state_dict()}, tmp_path / "plain.pt")
    with (
        zipfile.ZipFile(tmp_path / "plain.pt") as src,
        zipfile.ZipFile(tmp_path / "bomb.pt", "w", zipfile.ZIP_DEFLATED) as out,
    ):
        for info in src.infolist():
            out.writestr(info.filename, src.read(info.filename))
    ref = CheckpointRef(tmp_path / "bomb.pt", "torch")
    assert re.match(r"zip member '.*' is compressed \(\d+ bytes stored", check_complete(ref) or "")
    with pytest.raises(
        CheckpointError, match=r"bomb\.pt: zip member .* torch\.save never compresses"
    ):
        load_checkpoint(ref, mlp)


# --------------------------------------------------------------------------- the daemon, end to end


def ddsmon(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ddsmon.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        cwd=REPO,
    )


def faulty_directory(root: Path) -> Path:
    """Two good checkpoints and one of each fault the issue reported."""
    ckpts = root / "ckpts"
    ckpts.mkdir()
    for step in (10, 20):
        torch.save({"model": mlp(seed=step).state_dict(), "step": step}, ckpts / f"step_{step}.pt")
    fifo_state = hf_folder(ckpts, mlp(), "model.safetensors").rename(ckpts / "checkpoint-30")
    (fifo_state / "trainer_state.json").unlink()
    os.mkfifo(fifo_state / "trainer_state.json")
    zero_state = hf_folder(ckpts, mlp(), "model.safetensors").rename(ckpts / "checkpoint-40")
    (zero_state / "trainer_state.json").unlink()
    (zero_state / "trainer_state.json").symlink_to("/dev/zero")
    dcp_save({"model": mlp().state_dict()}, ckpts / "step_50")
    data = next((ckpts / "step_50").glob("*.distcp"))
    data.unlink()
    os.mkfifo(data)
    os.mkfifo(ckpts / "step_60.pt")
    sparse_safetensors(ckpts / "step_70.safetensors")
    return ckpts


def test_scan_reports_each_fault_and_reads_the_rest(tmp_path: Path, probe: Path) -> None:
    ckpts = faulty_directory(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = ddsmon(
        "scan", str(ckpts), "--model", FACTORY, "--probe", str(probe), "--tracking-uri", uri,
        "--no-plots", timeout=240,
    )  # fmt: skip
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-3000:]
    assert "2 read" in result.stderr and "5 failed" in result.stderr, out[-3000:]
    for needle in (
        "trainer_state.json: not a regular file (FIFO)",
        "trainer_state.json: not a regular file (character device, through the symbolic "
        "link to /dev/zero)",
        "not a regular file (FIFO)",
        "no key of the model in the checkpoint",
    ):
        assert needle in " ".join(out.split()), f"{needle!r} not in {out[-3000:]}"
    assert "step_50" in out and ".distcp: not a regular file (FIFO)" in out


def test_watch_with_a_fifo_checkpoint_stops_on_sigterm(tmp_path: Path, probe: Path) -> None:
    ckpts = faulty_directory(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    from mlflow.tracking import MlflowClient

    MlflowClient(uri).search_experiments()  # the store's tables exist before two processes use it
    args = [sys.executable, "-m", "ddsmon.cli", "watch", str(ckpts), "--model", FACTORY,
            "--probe", str(probe), "--tracking-uri", uri, "--no-plots", "--poll", "0.5"]  # fmt: skip
    proc = subprocess.Popen(
        args,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 180
        steps: list[int] = []
        while time.monotonic() < deadline and sorted(steps) != [10, 20]:
            time.sleep(1)
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            try:
                client = MlflowClient(uri)
                exp = client.get_experiment_by_name("ddsmon")
                runs = client.search_runs([exp.experiment_id]) if exp else []
                if runs:
                    history = client.get_metric_history(runs[0].info.run_id, CHECKPOINT_METRIC)
                    steps = [m.step for m in history]
            except Exception:
                continue
        assert sorted(steps) == [10, 20], f"the good checkpoints were not read: {steps}"
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err[-3000:]
        assert time.monotonic() - started < 60
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
