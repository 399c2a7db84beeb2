"""Settings: ddsmon.toml < --config < flags, and clear errors naming the file and key."""

from __future__ import annotations

from pathlib import Path

import click
import pytest

from ddsmon.cli import _build_config, main
from ddsmon.config import Config, load_config_file, redact_uri
from ddsmon.errors import ConfigError


def _ctx(args: list[str]) -> click.Context:
    command = main.commands["scan"]
    return command.make_context("scan", list(args), resilient_parsing=False)


def _config(args: list[str]) -> Config:
    ctx = _ctx(args)
    params = dict(ctx.params)
    directory = params.pop("directory")
    params.pop("fail_on_event", None)
    with ctx:
        return _build_config(ctx, directory, **params)


def test_toml_in_directory_is_read_and_flags_win(tmp_path: Path) -> None:
    (tmp_path / "ddsmon.toml").write_text(
        'model = "m.py:make"\nprobe = "p.pt"\nloss = "mse"\nexperiment = "from-toml"\n'
        "[events]\nratio_decades = 3.0\n"
    )
    config = _config([str(tmp_path), "--experiment", "from-flag"])
    assert config.model == "m.py:make"
    assert config.loss == "mse"
    assert config.experiment == "from-flag"
    assert config.events == {"ratio_decades": 3.0}


def test_config_file_overrides_directory_toml(tmp_path: Path) -> None:
    (tmp_path / "ddsmon.toml").write_text('loss = "mse"\ndevice = "cpu"\n')
    other = tmp_path / "other.toml"
    other.write_text('loss = "ce"\n')
    config = _config([str(tmp_path), "--config", str(other)])
    assert config.loss == "ce"
    assert config.device == "cpu"


def test_defaults_without_files(tmp_path: Path) -> None:
    config = _config([str(tmp_path)])
    assert config.tracking_uri == "sqlite:///mlflow.db"
    assert config.forward_dtype == "float64"
    assert config.resolved_state_dir == tmp_path / ".ddsmon"


def test_unknown_key_names_file_and_key(tmp_path: Path) -> None:
    bad = tmp_path / "ddsmon.toml"
    bad.write_text('modle = "x:y"\n')
    with pytest.raises(ConfigError, match=r"ddsmon.toml: unknown key 'modle'"):
        load_config_file(bad)


@pytest.mark.parametrize("value", ["0", "-2", "1.5", '"4"', "true"])
@pytest.mark.parametrize("key", ["threads", "max_probe_rows"])
def test_counts_that_are_not_whole_numbers_name_file_and_key(
    tmp_path: Path, key: str, value: str
) -> None:
    bad = tmp_path / "ddsmon.toml"
    bad.write_text(f"{key} = {value}\n")
    with pytest.raises(ConfigError, match=rf"ddsmon.toml: {key} must be a whole number >= 1"):
        load_config_file(bad)


def test_threads_is_read_from_toml_and_not_applied_by_parsing(tmp_path: Path) -> None:
    import torch

    before = torch.get_num_threads()
    (tmp_path / "ddsmon.toml").write_text(f"threads = {before + 1}\n")
    assert _config([str(tmp_path)]).threads == before + 1
    assert torch.get_num_threads() == before  # the Daemon and ``report`` apply it
    (tmp_path / "elsewhere").mkdir()
    assert _config([str(tmp_path / "elsewhere")]).threads is None


def test_unknown_event_key_names_it(tmp_path: Path) -> None:
    bad = tmp_path / "c.toml"
    bad.write_text("[events]\nratio_decade = 1\n")
    with pytest.raises(ConfigError, match=r"unknown key 'ratio_decade' in \[events\]"):
        load_config_file(bad)


def test_invalid_toml_names_file(tmp_path: Path) -> None:
    bad = tmp_path / "c.toml"
    bad.write_text("model = \n")
    with pytest.raises(ConfigError, match=r"c.toml is not valid TOML"):
        load_config_file(bad)


def test_paths_in_toml_are_relative_to_the_file(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    path = tmp_path / "sub" / "c.toml"
    path.write_text('events_json = "ev.jsonl"\n')
    assert load_config_file(path)["events_json"] == (tmp_path / "sub" / "ev.jsonl").resolve()


@pytest.mark.parametrize(
    ("uri", "shown"),
    [
        ("http://alice:s3cret@host:5000/x", "http://***@host:5000/x"),
        ("http://host:5000", "http://host:5000"),
        ("sqlite:///mlflow.db", "sqlite:///mlflow.db"),
        ("postgresql://u:p@127.0.0.1:5432/db", "postgresql://***@127.0.0.1:5432/db"),
    ],
)
def test_redact_uri(uri: str, shown: str) -> None:
    assert redact_uri(uri) == shown
