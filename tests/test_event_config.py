"""EventConfig.from_dict, the one parser of the ``[events]`` table: every wrong key, type
or range is a ConfigError naming the key (and the file), never a raw TypeError."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest

from ddsmon.errors import ConfigError
from ddsmon.events import EventConfig, EventDetector

SOURCE = "config file /runs/ddsmon.toml"


def test_a_table_of_good_values() -> None:
    cfg = EventConfig.from_dict(
        {"ratio_decades": 3, "reference_window": 10, "readings": ["lambda_ratio", "logdet"]},
        source=SOURCE,
    )
    assert cfg.ratio_decades == 3.0 and isinstance(cfg.ratio_decades, float)  # an int is a number
    assert cfg.reference_window == 10
    assert cfg.readings == ("lambda_ratio", "logdet")
    assert cfg.rank_readings == ("x_rank", "g_rank")  # missing keys keep their defaults
    assert cfg.volume_mad_k == EventConfig().volume_mad_k
    assert EventConfig.from_dict({}) == EventConfig()
    assert EventConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    # the detector restores its config through the same parser
    state = json.loads(json.dumps(EventDetector(cfg).to_state()))
    assert EventDetector.from_state(state).config == cfg


@pytest.mark.parametrize(
    ("key", "value", "says"),
    [
        ("ratio_decades", "x", "must be a number, got str 'x'"),
        ("ratio_decades", True, "must be a number, got bool True"),
        ("ratio_decades", None, "must be a number, got NoneType None"),
        ("volume_mad_k", [1.0], "must be a number, got list"),
        ("ratio_decades", math.nan, "must be a finite number, got nan"),
        ("volume_min_decades", math.inf, "must be a finite number, got inf"),
        ("reference_window", 8.0, "must be a whole number, got float 8.0"),
        ("confirm", 1.5, "must be a whole number, got float 1.5"),
        ("min_collapses", False, "must be a whole number, got bool False"),
        ("rank_hysteresis", "2", "must be a whole number, got str '2'"),
        ("readings", 3, "must be a list of reading names, got int 3"),
        ("readings", "lambda_ratio", "must be a list of reading names, got str"),
        ("rank_readings", {"x_rank": 1}, "must be a list of reading names, got dict"),
        ("readings", ["lambda_ratio", 2], "must be a list of reading names, got 2"),
    ],
)
def test_wrong_types_name_the_key_and_the_file(key: str, value: Any, says: str) -> None:
    with pytest.raises(ConfigError) as info:
        EventConfig.from_dict({key: value}, source=SOURCE)
    message = str(info.value)
    assert message.startswith(f"{SOURCE}: [events] {key} "), message
    assert says in message
    # without a source: the same, as "event config"
    with pytest.raises(ConfigError, match=rf"^event config: {key} must be"):
        EventConfig.from_dict({key: value})
    # and building one directly checks the same (no raw TypeError from a comparison)
    with pytest.raises(ConfigError, match=rf"^event config: {key} must be"):
        EventConfig(**{key: value})


@pytest.mark.parametrize(
    ("values", "says"),
    [
        ({"ratio_decades": 0}, "ratio_decades must be positive, got 0.0"),
        ({"volume_min_decades": -1.0}, "volume_min_decades must be positive, got -1.0"),
        ({"reference_window": 0}, "reference_window must be positive, got 0"),
        ({"min_reference": 0}, "min_reference must be positive, got 0"),
        ({"rank_hysteresis": -2}, "rank_hysteresis must be positive, got -2"),
        ({"rank_min_change": 0}, "rank_min_change must be positive, got 0"),
        ({"transition_window": 0}, "transition_window must be positive, got 0"),
        ({"min_collapses": 0}, "min_collapses must be positive, got 0"),
        ({"volume_mad_k": -0.5}, "volume_mad_k must be >= 0, got -0.5"),
        ({"confirm": -1}, "confirm must be >= 0, got -1"),
        ({"reference_lag": -1}, "reference_lag must be >= 0, got -1"),
        (
            {"min_reference": 9, "reference_window": 8},
            "min_reference (9) cannot exceed reference_window (8)",
        ),
        (
            {"confirm": 8, "transition_window": 8},
            "confirm (8) must be below transition_window (8)",
        ),
    ],
)
def test_out_of_range_values_name_the_key_and_the_file(values: dict, says: str) -> None:
    with pytest.raises(ConfigError) as info:
        EventConfig.from_dict(values, source=SOURCE)
    message = str(info.value)
    assert message.startswith(f"{SOURCE}: [events] "), message
    assert says in message
    with pytest.raises(ConfigError, match=r"^event config: "):
        EventConfig.from_dict(values)


def test_the_edges_of_the_ranges_are_allowed() -> None:
    cfg = EventConfig.from_dict(
        {"volume_mad_k": 0, "confirm": 0, "reference_lag": 0, "min_reference": 8}
    )
    assert (cfg.volume_mad_k, cfg.confirm, cfg.reference_lag, cfg.min_reference) == (0, 0, 0, 8)
    assert EventConfig.from_dict({"readings": []}).readings == ()
    assert EventConfig(readings=("lambda_ratio",)).readings == ("lambda_ratio",)


def test_unknown_keys_name_every_one_and_the_file() -> None:
    with pytest.raises(ConfigError) as info:
        EventConfig.from_dict({"ratio_decade": 1}, source=SOURCE)
    message = str(info.value)
    assert message.startswith(f"{SOURCE}: unknown key 'ratio_decade' in [events] (known: ")
    assert "ratio_decades" in message and "rank_readings" in message
    with pytest.raises(ConfigError, match=r"unknown keys 'lag', 'window' in \[events\]"):
        EventConfig.from_dict({"lag": 1, "ratio_decades": 2.0, "window": 3}, source=SOURCE)
    with pytest.raises(ConfigError, match=r"^event config: unknown key\(s\) \['lag', 'window'\]"):
        EventConfig.from_dict({"window": 3, "lag": 1})


def test_unknown_or_unfit_readings_name_the_reading_and_the_known_ones() -> None:
    with pytest.raises(ConfigError) as info:
        EventConfig.from_dict({"readings": ["lambda_ratio", "lamda_min"]}, source=SOURCE)
    message = str(info.value)
    assert message.startswith(f"{SOURCE}: [events] readings: unknown reading(s) ['lamda_min']")
    assert "known: sigma_min, sigma_max, x_rank" in message
    with pytest.raises(ConfigError, match=r"rank_readings: unknown reading\(s\) \['x_rnak'\]"):
        EventConfig.from_dict({"rank_readings": ["x_rnak"]})
    # a count has no decades: it is watched for rank changes, not collapses
    with pytest.raises(ConfigError, match=r"readings: 'x_rank' is a count.*rank_readings"):
        EventConfig.from_dict({"readings": ["x_rank"]}, source=SOURCE)
    with pytest.raises(ConfigError, match=r"rank_readings: 'lambda_min' is not a count \(value\)"):
        EventConfig.from_dict({"rank_readings": ["lambda_min"]}, source=SOURCE)
    ok = EventConfig.from_dict({"rank_readings": ["x_dead", "param_rank"]})
    assert ok.rank_readings == ("x_dead", "param_rank")


@pytest.mark.parametrize("data", [None, [("ratio_decades", 2.0)], "ratio_decades = 2"])
def test_not_a_table(data: Any) -> None:
    with pytest.raises(ConfigError, match=rf"^{SOURCE}: \[events\] must be a table"):
        EventConfig.from_dict(data, source=SOURCE)
    with pytest.raises(ConfigError, match="must be a table"):
        EventConfig.from_dict(data)
