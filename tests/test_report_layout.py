"""``ddsmon report`` as a log file and an 80-column terminal show it (issue 13).

Real ``python -m ddsmon.cli report`` subprocesses on a model with GPT-2's dotted layer
names (:mod:`fixtures_long_names`, 49 layers, names up to 28 characters) and every
reading column, the parameter side's included: whether piped with ``COLUMNS=80`` or
piped with no width at all, every layer name and every value, formatted as the table
formats it (3 significant digits, ``<floor`` when unresolved, ``rank/dead``), is printed
whole on its layer's rows, and at ``COLUMNS=80`` no line is wider than 80 columns. The
values are those ``report --json`` gives for the same checkpoint. The step is the one
``scan`` and ``watch`` take: from the content, else from the name.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fixtures_long_names import LAYER_NAMES, gpt_like
from rich.cells import cell_len

REPO = Path(__file__).resolve().parents[1]
FACTORY = f"{REPO / 'tests' / 'fixtures_long_names.py'}:gpt_like"


def report(ckpt: Path, probe: Path, *args: str, columns: str | None) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    if columns is not None:
        env["COLUMNS"] = columns
    env["PYTHONPATH"] = str(REPO)
    done = subprocess.run(
        [sys.executable, "-m", "ddsmon.cli", "report", str(ckpt), "--model", FACTORY,
         "--probe", str(probe), *args],
        capture_output=True, text=True, timeout=240, env=env, cwd=REPO,
        stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stdout


def shown_value(value: float | int | None, floor: float | None) -> str:
    """A reading as the table prints it: 3 significant digits; ``<floor`` (2 digits) when
    below the floor; an integer as it is."""
    if value is None:
        return "—" if floor is None else f"<{floor:.2g}"
    if isinstance(value, int):
        return str(value)
    return format(value, ".3g")


#: The readings the table shows for each layer (value, its floor) and the rank cells.
_VALUES = (
    ("sigma_min", "floor_x"), ("lambda_min", "floor_g"), ("lambda_max", "floor_g"),
    ("logdet", None), ("log_volume", None), ("u_dead_gain", None), ("x_entropy", None),
    ("param_lambda_min", "param_floor"), ("param_rank", None),
)  # fmt: skip


def expected_cells(layer: dict) -> list[str]:
    cells = [str(layer["d"]), str(layer["N"])]
    cells += [f"{layer['x_rank']}/{layer['x_dead']}", f"{layer['g_rank']}/{layer['g_dead']}"]
    for name, floor in _VALUES:
        cells.append(shown_value(layer[name], layer[floor] if floor else None))
    return cells


def rows_of(text: str, name: str) -> list[list[str]]:
    """The cells (split on spaces) of every table line that starts with layer ``name``."""
    return [ln.split()[1:] for ln in text.splitlines() if ln.split()[:1] == [name]]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A bare state dict (no step inside) named for step 100."""
    folder = tmp_path_factory.mktemp("ckpts")
    path = folder / "step_100.pt"
    torch.save(gpt_like().state_dict(), path)
    return path


@pytest.fixture(scope="module")
def readings(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    from fixtures_models import mlp_probe

    x, y = mlp_probe()
    probe = tmp_path_factory.mktemp("probe") / "probe.pt"
    torch.save({"inputs": x, "targets": y}, probe)
    data = json.loads(report(checkpoint, probe, "--json", columns=None))
    data["probe"] = probe
    return data


def test_report_takes_the_step_from_the_name_like_scan(checkpoint: Path, readings: dict) -> None:
    assert readings["step"] == 100
    assert list(readings["layers"]) == list(LAYER_NAMES)
    # a step inside the file wins over its name, as in scan and watch
    inside = checkpoint.parent / "step_200.pt"
    torch.save({"model": gpt_like().state_dict(), "step": 7}, inside)
    data = json.loads(report(inside, readings["probe"], "--json", columns=None))
    assert data["step"] == 7


@pytest.mark.parametrize("columns", ["80", None], ids=["COLUMNS=80", "piped"])
def test_every_layer_and_value_whole(checkpoint: Path, readings: dict, columns: str | None) -> None:
    text = report(checkpoint, readings["probe"], columns=columns)
    lines = text.splitlines()
    assert lines[0].startswith("step_100.pt  step 100  n=32"), lines[0]
    layers = readings["layers"]
    assert any(layer["param_rank"] is not None for layer in layers.values())  # K side shown
    for name, layer in layers.items():
        rows = rows_of(text, name)
        cells = [c for row in rows for c in row]
        expected = expected_cells(layer)
        missing = [c for c in expected if c not in cells]
        assert not missing, f"{name}: {missing} not in {rows}"
        assert not any("…" in c for c in cells), rows
    assert "…" not in text
    widths = [cell_len(ln) for ln in lines]
    if columns == "80":
        assert max(widths) <= 80, [ln for ln in lines if cell_len(ln) > 80]
        # split over several tables, each row of each naming its layer
        assert all(len(rows_of(text, n)) == len(rows_of(text, "lm_head")) > 1 for n in layers)
    else:
        # no width to fit: one table at its own width, one row per layer
        assert all(len(rows_of(text, n)) == 1 for n in layers)
        assert max(widths) > 80
