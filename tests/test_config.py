"""Settings: ddsmon.toml < --config < flags, every value type-checked, the trust boundary
of a directory's ddsmon.toml, and clear errors naming the file and key."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import click
import click.testing
import pytest

from ddsmon.cli import _given, main
from ddsmon.config import (
    SETTINGS,
    Config,
    allow_file,
    is_allowed,
    load_config_file,
    parse_size,
    resolve_config,
)
from ddsmon.errors import ConfigError
from ddsmon.events import EventConfig


def _config(args: list[str]) -> Config:
    """What ``ddsmon scan ARGS`` resolves, through the real click command."""
    command = main.commands["scan"]
    ctx = command.make_context("scan", list(args), resilient_parsing=False)
    params = dict(ctx.params)
    directory = params.pop("directory")
    config_file = params.pop("config_file")
    with ctx:
        return resolve_config(directory, _given(ctx, params), config_file=config_file)


@pytest.fixture(autouse=True)
def _allow_list(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Each test has its own (empty) allow list."""
    home = tmp_path / "xdg"
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home))
    return home


def test_toml_in_directory_is_read_and_flags_win(tmp_path: Path) -> None:
    (tmp_path / "ddsmon.toml").write_text(
        'probe = "p.pt"\nloss = "mse"\nexperiment = "from-toml"\n[events]\nratio_decades = 3.0\n'
    )
    config = _config([str(tmp_path), "--experiment", "from-flag"])
    assert config.read.probe == "p.pt"
    assert config.read.loss == "mse"
    assert config.tracking.experiment == "from-flag"
    assert config.events == EventConfig(ratio_decades=3.0)


def test_config_file_overrides_directory_toml(tmp_path: Path) -> None:
    (tmp_path / "ddsmon.toml").write_text('loss = "mse"\ndevice = "cpu"\n')
    other = tmp_path / "other.toml"
    other.write_text('loss = "ce"\n')
    config = _config([str(tmp_path), "--config", str(other)])
    assert config.read.loss == "ce"
    assert config.read.device == "cpu"


def test_defaults_without_files(tmp_path: Path) -> None:
    config = _config([str(tmp_path)])
    assert config.tracking.tracking_uri == "sqlite:///mlflow.db"
    assert config.read.forward_dtype == "float64"
    assert config.watch is not None and config.watch.state_dir == tmp_path / ".ddsmon"
    assert config.events == EventConfig()


def test_every_default_comes_from_the_table(tmp_path: Path) -> None:
    """The typed sub-configs and the CLI's options default to SETTINGS, key by key."""
    config = Config.for_directory(tmp_path)
    sections = {"read": config.read, "tracking": config.tracking, "alerts": config.alerts}
    scan = {p.name: p for p in main.commands["scan"].params}
    for setting in SETTINGS.values():
        if setting.section in sections:
            assert getattr(sections[setting.section], setting.name) == setting.default
        if setting.name in scan and setting.kind != "kinds":
            assert scan[setting.name].default == setting.default, setting.name


def test_env_tracking_uri_beats_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    named = tmp_path / "mine.toml"
    named.write_text('tracking_uri = "sqlite:///a.db"\n')
    args = [str(tmp_path), "--config", str(named)]
    assert _config(args).tracking.tracking_uri == "sqlite:///a.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///b.db")
    assert _config(args).tracking.tracking_uri == "sqlite:///b.db"


def test_unknown_key_names_file_and_key(tmp_path: Path) -> None:
    bad = tmp_path / "ddsmon.toml"
    bad.write_text('modle = "x:y"\n')
    with pytest.raises(ConfigError, match=r"ddsmon.toml: unknown key 'modle'"):
        load_config_file(bad)


@pytest.mark.parametrize("value", ["0", "-2", "1.5", '"4"', "true"])
@pytest.mark.parametrize("key", ["threads", "max_probe_rows", "probe_batch"])
def test_counts_that_are_not_whole_numbers_name_file_and_key(
    tmp_path: Path, key: str, value: str
) -> None:
    bad = tmp_path / "ddsmon.toml"
    bad.write_text(f"{key} = {value}\n")
    with pytest.raises(ConfigError, match=rf"ddsmon.toml: {key} must be a whole number >= 1"):
        load_config_file(bad)


@pytest.mark.parametrize(
    ("line", "key"),
    [
        ('trust_checkpoints = "false"', "trust_checkpoints"),
        ('plots = "no"', "plots"),
        ('prefetch = "false"', "prefetch"),
        ("model = 5", "model"),
        ('probe = ["a"]', "probe"),
        ("loss = 5", "loss"),
        ("layers = 3", "layers"),
        ('layers = "blocks.(0|1"', "layers"),
        ('layers = ","', "layers"),
        ('layers = " , "', "layers"),
        ('poll = "fast"', "poll"),
        ('quiet = "x"', "quiet"),
        ("poll = inf", "poll"),
        ("quiet = nan", "quiet"),
        ("poll = 0.0", "poll"),
        ("tracking_uri = 42", "tracking_uri"),
        ("state_dir = 7", "state_dir"),
        ("events_json = 7", "events_json"),
        ('on_event = ["x"]', "on_event"),
        ('fail_on_event = "bogus"', "fail_on_event"),
        ('fail_on_event = ["collapse", 3]', "fail_on_event"),
        ('fisher = "all"', "fisher"),
        ('forward_dtype = "float16"', "forward_dtype"),
        ('experiment = ""', "experiment"),
        ('memory_budget = "lots"', "memory_budget"),
        ("memory_budget = 0", "memory_budget"),
        ("memory_budget = 1.5", "memory_budget"),
        ('factor_budget = "4 XiB"', "factor_budget"),
        ("factor_budget = true", "factor_budget"),
    ],
)
def test_every_value_is_checked_against_its_type(tmp_path: Path, line: str, key: str) -> None:
    """A wrong type is a ConfigError naming the file and the key, never a truthy string
    nor a raw traceback later."""
    bad = tmp_path / "ddsmon.toml"
    bad.write_text(line + "\n")
    with pytest.raises(ConfigError, match=rf"ddsmon.toml: {key} must be "):
        load_config_file(bad)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("512MiB", 512 * 2**20),
        ("4GiB", 4 * 2**30),
        ("4gib", 4 * 2**30),
        ("1.5GiB", 3 * 2**29),
        (" 64 KiB ", 64 * 1024),
        ("2GB", 2 * 10**9),
        ("2G", 2 * 10**9),
        ("10kB", 10_000),
        ("1073741824", 2**30),
        ("1_000_000", 10**6),
        ("100B", 100),
        ("0.5KiB", 512),
        ("1.0000001KiB", 1024),  # a fraction of a byte rounds down
        (1073741824, 2**30),
    ],
)
def test_sizes_are_bytes_with_or_without_a_unit(text: object, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize(
    "text",
    ["", "lots", "GiB", "4 XiB", "1.2.3GiB", ".", "-1GiB", "0", "0.4B", 0, -5, 1.5, True, None],
)
def test_what_is_not_a_size(text: object) -> None:
    assert parse_size(text) is None


def test_streaming_budgets_from_toml_and_flags(tmp_path: Path) -> None:
    (tmp_path / "ddsmon.toml").write_text(
        'memory_budget = "512MiB"\nfactor-budget = 4294967296\nprobe_batch = 8\n'
    )
    read = _config([str(tmp_path)]).read
    assert (read.memory_budget, read.factor_budget, read.probe_batch) == (512 << 20, 4 << 30, 8)
    read = _config([str(tmp_path), "--memory-budget", "2GiB", "--probe-batch", "3"]).read
    assert (read.memory_budget, read.factor_budget, read.probe_batch) == (2 << 30, 4 << 30, 3)
    with pytest.raises(
        ConfigError, match=r"--factor-budget: factor_budget must be a size in bytes.*'4 gigs'"
    ):
        _config([str(tmp_path), "--factor-budget", "4 gigs"])
    with pytest.raises(ConfigError, match=r"ddsmon.toml: memory_budget must be a size"):
        (tmp_path / "ddsmon.toml").write_text('memory_budget = "-1GiB"\n')
        _config([str(tmp_path)])


def test_a_bad_size_on_the_command_line_exits_2_naming_the_flag(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "ddsmon.cli", "scan", str(tmp_path), "--memory-budget", "big",
         "--probe", "p.pt"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "--memory-budget: memory_budget must be a size in bytes" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_layers_may_be_a_list(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('layers = ["0", "2"]\nfail_on_event = "transition"\n')
    values = load_config_file(path)
    assert values["layers"] == "0,2"
    assert values["fail_on_event"] == ("transition",)


@pytest.mark.parametrize("args", [["--poll", "inf"], ["--quiet", "nan"]])
def test_non_finite_intervals_on_the_command_line_exit_2(tmp_path: Path, args: list[str]) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "ddsmon.cli", "watch", str(tmp_path), *args, "--probe", "p.pt"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert f"{args[0]}: " in proc.stderr and "finite" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_threads_is_read_from_toml_and_not_applied_by_parsing(tmp_path: Path) -> None:
    import torch

    before = torch.get_num_threads()
    (tmp_path / "ddsmon.toml").write_text(f"threads = {before + 1}\n")
    assert _config([str(tmp_path)]).read.threads == before + 1
    assert torch.get_num_threads() == before  # the Reader applies it
    (tmp_path / "elsewhere").mkdir()
    assert _config([str(tmp_path / "elsewhere")]).read.threads is None


def test_unknown_event_key_names_it(tmp_path: Path) -> None:
    bad = tmp_path / "c.toml"
    bad.write_text("[events]\nratio_decade = 1\n")
    with pytest.raises(ConfigError, match=r"c.toml.*ratio_decade"):
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


# --------------------------------------------------------------------------- trust boundary

RISKY = (
    'model = "evil.py:make"\n'
    'probe = "evil.py:probe"\n'
    'loss = "evil.py:loss"\n'
    "trust_checkpoints = true\n"
    'on_event = "touch pwned"\n'
    'experiment = "harmless"\n'
)


def test_a_directory_toml_cannot_set_code_running_keys(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "ddsmon.toml").write_text(RISKY)
    config = _config([str(tmp_path)])
    assert config.read.model is None and config.read.probe is None
    assert config.read.loss == "ce" and config.read.trust_checkpoints is False
    assert config.alerts.on_event is None
    assert config.tracking.experiment == "harmless"  # the rest of the file still counts
    text = caplog.text
    for key in ("model", "probe", "loss", "trust_checkpoints", "on_event"):
        assert key in text
    assert "ddsmon allow" in text
    assert len(config.ignored) == 5


@pytest.mark.parametrize(
    "line",
    [
        'events_json = "/tmp/elsewhere/.bashrc"',
        'state_dir = "/tmp/elsewhere"',
        'tracking_uri = "http://collector.invalid:5000"',
        'run_id = "0123456789abcdef"',
    ],
)
def test_a_directory_toml_cannot_write_or_send_elsewhere(tmp_path: Path, line: str) -> None:
    """Files written outside the directory (events_json, state_dir) and where the readings
    go (tracking_uri, run_id) are refused from a directory file, like code."""
    (tmp_path / "ddsmon.toml").write_text(line + "\n")
    config = _config([str(tmp_path)])
    key = line.split(" = ")[0]
    assert config.ignored == (f"{tmp_path / 'ddsmon.toml'}: {key}",)
    assert config.alerts.events_json is None and config.tracking.run_id is None
    assert config.tracking.tracking_uri == "sqlite:///mlflow.db"
    assert config.watch is not None and config.watch.state_dir == tmp_path / ".ddsmon"


def test_a_probe_spec_with_a_colon_is_code_even_when_such_a_file_exists(tmp_path: Path) -> None:
    """A file literally named ``evil.py:probe`` could be deleted between the check and the
    load: the spec counts as a function whatever is on disk."""
    (tmp_path / "evil.py:probe").write_bytes(b"")
    (tmp_path / "ddsmon.toml").write_text(f'probe = "{tmp_path / "evil.py:probe"}"\n')
    assert _config([str(tmp_path)]).read.probe is None


def test_a_probe_file_and_builtin_loss_are_not_code(tmp_path: Path) -> None:
    (tmp_path / "p.pt").write_bytes(b"")
    (tmp_path / "ddsmon.toml").write_text(f'probe = "{tmp_path / "p.pt"}"\nloss = "mse"\n')
    config = _config([str(tmp_path)])
    assert config.read.probe == str(tmp_path / "p.pt") and config.read.loss == "mse"
    assert config.ignored == ()


def test_flags_and_a_named_config_may_set_them(tmp_path: Path) -> None:
    (tmp_path / "ddsmon.toml").write_text(RISKY)
    named = tmp_path / "mine.toml"
    named.write_text('model = "mine.py:make"\ntrust_checkpoints = true\n')
    config = _config([str(tmp_path), "--config", str(named), "--on-event", "echo hi"])
    assert config.read.model == "mine.py:make"
    assert config.read.trust_checkpoints is True
    assert config.alerts.on_event == "echo hi"
    assert config.read.probe is None  # still only the directory file's, still refused


def test_an_allowed_file_may_set_them_until_it_changes(tmp_path: Path, _allow_list: Path) -> None:
    toml = tmp_path / "ddsmon.toml"
    toml.write_text(RISKY)
    assert not is_allowed(toml)
    allow_file(toml)
    assert is_allowed(toml)
    assert json.loads((_allow_list / "ddsmon" / "allowed.json").read_text())
    config = _config([str(tmp_path)])
    assert config.read.model == "evil.py:make" and config.alerts.on_event == "touch pwned"
    toml.write_text(RISKY + "# edited\n")
    assert not is_allowed(toml)
    assert _config([str(tmp_path)]).read.model is None


def test_watching_a_hostile_directory_runs_none_of_its_code(tmp_path: Path, probe: Path) -> None:
    """End to end: a real scan of a directory whose ddsmon.toml names code in the directory.
    The module would write a marker when imported and the hook would create a file; neither
    happens, and the error says which keys were ignored and how to allow them."""
    ckpts = tmp_path / "ckpts"
    ckpts.mkdir()
    marker = tmp_path / "imported"
    (ckpts / "evil.py").write_text(
        f"open({str(marker)!r}, 'w').write('x')\n"
        "def make():\n    raise SystemExit(0)\n"
        "def probe():\n    raise SystemExit(0)\n"
        "def loss(o, t):\n    raise SystemExit(0)\n"
    )
    (ckpts / "ddsmon.toml").write_text(
        RISKY.replace("evil.py", str(ckpts / "evil.py")).replace("pwned", str(tmp_path / "pwned"))
    )
    proc = subprocess.run(
        [sys.executable, "-m", "ddsmon.cli", "scan", str(ckpts), "--probe", str(probe)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env={**__import__("os").environ, "XDG_CONFIG_HOME": str(tmp_path / "xdg")},
    )
    assert proc.returncode == 2, proc.stderr
    assert not marker.exists() and not (tmp_path / "pwned").exists()
    assert "no model factory" in proc.stderr and "model was ignored" in proc.stderr
    assert "ddsmon allow" in proc.stderr


def test_allow_command(tmp_path: Path) -> None:
    toml = tmp_path / "ddsmon.toml"
    toml.write_text('model = "m.py:make"\n')
    result = click.testing.CliRunner().invoke(main, ["allow", str(toml)])
    assert result.exit_code == 0, result.output
    assert "allowed" in result.output and is_allowed(toml)
    toml.write_text("model = 3\n")
    result = click.testing.CliRunner().invoke(main, ["allow", str(toml)])
    assert result.exit_code == 2 and "model must be" in result.output


@pytest.mark.parametrize(
    ("spec", "chosen"),
    [
        ("0,2", ["0", "2"]),
        (" 0 , 2 ", ["0", "2"]),
        ("2", ["2"]),
        ("^[02]{1,2}$", ["0", "2"]),  # a regex with a comma is a regex, not two names
        ("0|2", ["0", "2"]),
    ],
)
def test_layers_are_names_or_a_regex(spec: str, chosen: list[str]) -> None:
    from torch import nn

    from ddsmon.probe import select_layers
    from ddsmon.reader import resolve_layers

    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    assert select_layers(model, resolve_layers(model, spec)) == chosen


def test_an_empty_layer_selection_is_an_error_not_a_reading_of_nothing() -> None:
    from torch import nn

    from ddsmon.errors import ProbeError
    from ddsmon.probe import select_layers

    with pytest.raises(ProbeError, match="names no module"):
        select_layers(nn.Sequential(nn.Linear(3, 4)), [])
