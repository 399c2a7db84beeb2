"""The quiet-ratio threshold (``ratio_mad_k``, ``ratio_min_decades``), on real readings:
the first layer of ``benchmarks/bench_events.py``'s sparse-parity run (tuning seed 0).

Its sigma_ratio scatters by about 0.002 decades on the plateau and falls 0.1-0.2 decades
inside the validation window, far under a fixed 2-decade threshold; its lambda_ratio
scatters by about 0.9 decades near G's trust floor and flickers past 2 decades at
random; its log_volume collapses inside the window. With the fixed threshold
(``ratio_mad_k = 0``, the rule before) the transition was built from a lambda_ratio
flicker; with the default the sigma_ratio fall is the second collapse, and the
flicker's events do not change (the threshold is never raised above ``ratio_decades``)."""

from __future__ import annotations

import pytest

from ddsmon.errors import ConfigError
from ddsmon.events import Event, EventConfig, EventDetector, detect_level_shifts

FIXED = {"ratio_mad_k": 0.0}  # the fixed 2-decade threshold of ratios, as before

# (step, val_acc, layer 0 sigma_ratio, log_volume, lambda_ratio) of every checkpoint of
# benchmarks/bench_events.py's parity run, seed 0 (readings cached by the bench; values
# rounded to 6 and 4 significant digits)
PARITY = (
    (0, 0.4978, 0.299932, -2229.54, 3.797e-13),
    (50, 0.5093, 0.299509, -2182.71, 5.991e-14),
    (100, 0.5015, 0.299662, -2151.15, 4.085e-11),
    (150, 0.499, 0.299374, -2179.43, 3.212e-11),
    (200, 0.5044, 0.299527, -2166.46, 6.642e-11),
    (250, 0.4941, 0.299675, -2184.04, 7.658e-13),
    (300, 0.4995, 0.299669, -2168.84, 3.944e-12),
    (350, 0.4841, 0.299862, -2207.47, 6.296e-11),
    (400, 0.4902, 0.299605, -2160.24, 8.73e-12),
    (450, 0.4846, 0.299621, -2218.46, 2.335e-13),
    (500, 0.5024, 0.299916, -2150.58, 9.278e-11),
    (550, 0.4905, 0.300329, -2123.65, 1.738e-10),
    (600, 0.5, 0.300284, -2160.98, 9.611e-11),
    (650, 0.4958, 0.299907, -2156.63, 4.406e-10),
    (700, 0.4902, 0.299856, -2186.68, 2.024e-10),
    (750, 0.5015, 0.300391, -2187.43, 4.227e-11),
    (800, 0.5112, 0.300141, -2225.79, 2.184e-12),
    (850, 0.5078, 0.300244, -2193.85, 4.419e-11),
    (900, 0.5024, 0.3001, -2189.48, 1.038e-13),
    (950, 0.5032, 0.30029, -2168.0, 1.339e-11),
    (1000, 0.5081, 0.300172, -2174.45, 7.618e-11),
    (1050, 0.5205, 0.300271, -2215.52, 8.116e-14),
    (1100, 0.5176, 0.300447, -2143.34, 2.536e-12),
    (1150, 0.5095, 0.300228, -2135.65, 1.177e-10),
    (1200, 0.5032, 0.300353, -2192.89, 1.019e-12),
    (1250, 0.51, 0.300662, -2148.42, 3.562e-12),
    (1300, 0.5063, 0.300335, -2154.69, 2.477e-12),
    (1350, 0.4973, 0.300636, -2157.9, 3.536e-11),
    (1400, 0.5159, 0.3009, -2189.35, 2.406e-11),
    (1450, 0.498, 0.300975, -2191.1, 7.286e-13),
    (1500, 0.5063, 0.300988, -2196.05, 1.678e-11),
    (1550, 0.5117, 0.301403, -2173.25, 1.087e-10),
    (1600, 0.5098, 0.301476, -2176.58, 2.489e-13),
    (1650, 0.5083, 0.301839, -2160.87, 1.312e-10),
    (1700, 0.5107, 0.30222, -2161.03, 3.558e-12),
    (1750, 0.4841, 0.302184, -2202.2, 1.991e-10),
    (1800, 0.4971, 0.302216, -2142.99, 8.491e-11),
    (1850, 0.5117, 0.302309, -2172.23, 3.133e-11),
    (1900, 0.5046, 0.302001, -2196.79, 4.77e-11),
    (1950, 0.4868, 0.301909, -2191.5, 1.806e-11),
    (2000, 0.4893, 0.30193, -2152.63, 2.633e-12),
    (2050, 0.5039, 0.30224, -2208.16, 7.773e-12),
    (2100, 0.4878, 0.302021, -2170.05, 3.27e-11),
    (2150, 0.512, 0.302276, -2148.79, 8.896e-11),
    (2200, 0.5164, 0.302003, -2170.57, 3.593e-11),
    (2250, 0.4863, 0.302235, -2191.72, 1.613e-12),
    (2300, 0.49, 0.302912, -2108.6, 3.244e-10),
    (2350, 0.4937, 0.302624, -2168.5, 1.801e-11),
    (2400, 0.4971, 0.302608, -2159.94, 1.036e-10),
    (2450, 0.5022, 0.302721, -2138.92, 2.597e-10),
    (2500, 0.4934, 0.302966, -2130.33, 3.542e-10),
    (2550, 0.5098, 0.302725, -2176.47, 8.44e-13),
    (2600, 0.5203, 0.302136, -2142.23, 3.877e-13),
    (2650, 0.5007, 0.302706, -2194.42, 1.739e-13),
    (2700, 0.5151, 0.30295, -2169.48, 8.976e-10),
    (2750, 0.5154, 0.302929, -2228.57, 2.573e-11),
    (2800, 0.5139, 0.302323, -2285.46, 9.943e-11),
    (2850, 0.5684, 0.301792, -2276.12, 4.27e-10),
    (2900, 0.5557, 0.301367, -2379.12, 8.537e-14),
    (2950, 0.5959, 0.30112, -2436.23, 1.424e-11),
    (3000, 0.6499, 0.300142, -2497.6, 1.985e-11),
    (3050, 0.6545, 0.299236, -2424.23, 2.254e-11),
    (3100, 0.6482, 0.297073, -2388.6, 6.834e-12),
    (3150, 0.595, 0.293914, -2457.62, 1.282e-11),
    (3200, 0.7419, 0.28848, -2471.32, 5.839e-14),
    (3250, 0.5969, 0.284189, -2433.64, 5.937e-12),
    (3300, 0.5942, 0.277581, -2375.72, 1.202e-10),
    (3350, 0.541, 0.270504, -2383.46, 7.495e-11),
    (3400, 0.6809, 0.263389, -2279.49, 2.589e-11),
    (3450, 0.6848, 0.256327, -2372.82, 1.458e-11),
    (3500, 0.7339, 0.248283, -2349.36, 3.412e-12),
    (3550, 0.8162, 0.240347, -2402.5, 3.048e-12),
    (3600, 0.7937, 0.233409, -2436.36, 1.073e-13),
    (3650, 0.8516, 0.225695, -2454.43, 1.034e-11),
    (3700, 0.8782, 0.218033, -2527.13, 9.371e-13),
    (3750, 0.8799, 0.210695, -2562.63, 8.68e-12),
    (3800, 0.8918, 0.203669, -2547.19, 2.859e-13),
    (3850, 0.9092, 0.19663, -2590.97, 9.543e-14),
    (3900, 0.9414, 0.19022, -2515.28, 9.261e-13),
    (3950, 0.9932, 0.183966, -2529.03, 5.458e-13),
    (4000, 0.9941, 0.178585, -2580.26, 1.028e-13),
    (4050, 1.0, 0.173921, -2569.57, 3.395e-13),
    (4100, 1.0, 0.16965, -2583.66, 1.112e-11),
    (4150, 1.0, 0.166004, -2587.21, 2.228e-11),
    (4200, 1.0, 0.162928, -2582.33, 1.509e-13),
    (4250, 1.0, 0.160192, -2599.33, 6.872e-12),
    (4300, 1.0, 0.157767, -2576.28, 1.125e-10),
    (4350, 1.0, 0.15563, -2590.34, 1.338e-11),
    (4400, 1.0, 0.153841, -2624.58, 8.913e-11),
    (4450, 1.0, 0.151858, -2659.77, 1.674e-13),
    (4500, 1.0, 0.150279, -2625.07, 1.04e-13),
    (4550, 1.0, 0.148973, -2646.52, 4.918e-13),
    (4600, 1.0, 0.147807, -2641.2, 1.452e-13),
    (4650, 1.0, 0.146674, -2624.97, 6.042e-12),
    (4700, 1.0, 0.145488, -2659.64, 3.371e-13),
    (4750, 1.0, 0.144429, -2676.88, 3.009e-13),
    (4800, 1.0, 0.143575, -2584.22, 4.214e-11),
    (4850, 1.0, 0.142731, -2641.53, 1.029e-11),
    (4900, 1.0, 0.141889, -2661.56, 1.513e-12),
    (4950, 1.0, 0.1411, -2638.34, 3.815e-12),
    (5000, 1.0, 0.140439, -2636.27, 1.595e-11),
    (5050, 1.0, 0.139806, -2662.83, 1.85e-12),
    (5100, 1.0, 0.139181, -2646.54, 4.256e-11),
    (5150, 1.0, 0.138611, -2670.66, 1.346e-12),
    (5200, 1.0, 0.138074, -2649.64, 4.537e-13),
    (5250, 1.0, 0.137521, -2667.02, 7.029e-13),
    (5300, 1.0, 0.136991, -2672.8, 1.977e-11),
    (5350, 1.0, 0.136542, -2670.77, 2.937e-13),
    (5400, 1.0, 0.136076, -2682.14, 3.4e-11),
    (5450, 1.0, 0.135605, -2681.71, 8.977e-12),
    (5500, 1.0, 0.13519, -2665.89, 7.016e-12),
    (5550, 1.0, 0.134765, -2660.38, 6.007e-11),
    (5600, 1.0, 0.134396, -2636.91, 3.078e-11),
    (5650, 1.0, 0.134029, -2673.97, 1.422e-13),
    (5700, 1.0, 0.133663, -2656.39, 6.027e-11),
    (5750, 1.0, 0.133313, -2668.8, 1.738e-12),
    (5800, 1.0, 0.132973, -2642.99, 3.718e-12),
    (5850, 1.0, 0.13265, -2653.11, 1.678e-12),
    (5900, 1.0, 0.132307, -2688.55, 2.978e-11),
    (5950, 1.0, 0.131983, -2625.36, 2.282e-12),
    (6000, 1.0, 0.131717, -2622.15, 1.167e-11),
    (6050, 1.0, 0.131439, -2665.89, 1.408e-12),
    (6100, 1.0, 0.131148, -2686.16, 3.974e-13),
    (6150, 1.0, 0.130879, -2683.47, 2.589e-13),
    (6200, 1.0, 0.130623, -2665.54, 1.272e-12),
    (6250, 1.0, 0.130366, -2662.68, 9.007e-14),
    (6300, 1.0, 0.13013, -2659.1, 1.445e-12),
    (6350, 1.0, 0.129896, -2627.55, 5.097e-12),
    (6400, 1.0, 0.129662, -2668.55, 7.123e-13),
    (6450, 1.0, 0.129422, -2663.68, 7.038e-12),
    (6500, 1.0, 0.129207, -2640.13, 1.688e-11),
    (6550, 1.0, 0.128995, -2659.88, 1.297e-13),
    (6600, 1.0, 0.128764, -2683.62, 7.727e-12),
    (6650, 1.0, 0.128588, -2665.41, 3.905e-13),
    (6700, 1.0, 0.128382, -2635.09, 2.211e-11),
    (6750, 1.0, 0.128182, -2638.67, 9.181e-12),
    (6800, 1.0, 0.127991, -2681.14, 9.302e-14),
    (6850, 1.0, 0.127792, -2702.81, 2.029e-12),
    (6900, 1.0, 0.127602, -2658.91, 6.331e-13),
    (6950, 1.0, 0.127429, -2664.59, 4.017e-13),
    (7000, 1.0, 0.127245, -2685.08, 3.36e-12),
    (7050, 1.0, 0.127095, -2664.72, 2.021e-12),
    (7100, 1.0, 0.126951, -2677.77, 9.948e-12),
    (7150, 1.0, 0.126776, -2721.13, 1.632e-12),
    (7200, 1.0, 0.126622, -2668.19, 2.326e-12),
    (7250, 1.0, 0.126465, -2667.36, 2.481e-12),
    (7300, 1.0, 0.126306, -2672.92, 1.94e-12),
    (7350, 1.0, 0.126165, -2683.35, 3.6e-12),
    (7400, 1.0, 0.126021, -2675.4, 9.6e-13),
    (7450, 1.0, 0.125869, -2704.79, 2.045e-13),
    (7500, 1.0, 0.125738, -2659.37, 3.495e-13),
    (7550, 1.0, 0.125586, -2640.92, 9.655e-12),
    (7600, 1.0, 0.125438, -2714.52, 1.513e-12),
    (7650, 1.0, 0.125316, -2694.85, 3.539e-12),
    (7700, 1.0, 0.125178, -2694.65, 1.274e-12),
    (7750, 1.0, 0.125045, -2668.25, 1.425e-11),
    (7800, 1.0, 0.124928, -2650.19, 2.492e-12),
    (7850, 1.0, 0.124798, -2712.37, 5.056e-13),
    (7900, 1.0, 0.124686, -2703.36, 1.043e-13),
    (7950, 1.0, 0.124565, -2675.22, 5.744e-12),
    (8000, 1.0, 0.124452, -2694.95, 1.394e-13),
)


def _history() -> list[tuple[int, dict]]:
    return [
        (s, {"name": "0", "sigma_ratio": sr, "log_volume": lv, "lambda_ratio": lr})
        for s, _, sr, lv, lr in PARITY
    ]


def _window() -> tuple[int, int]:
    """The validation window: where val_acc first passes 10% and 95% of the way from
    chance (1/2) to 1."""
    lo = next(s for s, acc, *_ in PARITY if acc > 0.5 + 0.1 * 0.5)
    hi = next(s for s, acc, *_ in PARITY if acc > 0.5 + 0.95 * 0.5)
    return lo, hi


def _events(cfg: EventConfig) -> list[Event]:
    det = EventDetector(cfg)
    out: list[Event] = []
    for (step, point), (_, acc, *_) in zip(_history(), PARITY):
        out += det.update(step, {"0": point}, {"val_acc": acc})
    return out


def _collapses(events: list[Event], reading: str) -> list[int]:
    return [e.step for e in events if e.kind == "collapse" and e.reading == reading]


def test_fixture_is_the_parity_run() -> None:
    assert len(PARITY) == 161 and PARITY[-1][0] == 8000
    assert _window() == (2850, 3950)


def test_fixed_threshold_misses_the_quiet_fall_and_rides_a_flicker() -> None:
    events = _events(EventConfig.from_dict(FIXED))
    assert _collapses(events, "sigma_ratio") == []
    assert _collapses(events, "log_volume") == [3000, 3700]
    (tr,) = [e for e in events if e.kind == "transition"]
    assert (tr.step, tr.completed_step, tr.reading, tr.label) == (
        3950, 3850, "log_volume,lambda_ratio", "generalising",
    )  # fmt: skip
    # its lambda_ratio collapse is one of a run of flickers that revive within a few
    # checkpoints: ten collapses by 4450, each revived
    flicker = _collapses(events, "lambda_ratio")
    assert len(flicker) == 10 and 3850 in flicker and max(flicker) == 4450
    revived = [e.step for e in events if e.kind == "revival" and e.reading == "lambda_ratio"]
    assert len(revived) == len(flicker)


def test_quiet_threshold_sees_the_fall_inside_the_window() -> None:
    lo, hi = _window()
    events = _events(EventConfig())
    (fall,) = [e for e in events if e.kind == "collapse" and e.reading == "sigma_ratio"]
    assert fall.step == 3400 and lo <= fall.step <= hi
    assert 0.05 <= fall.magnitude < 0.1  # decades: a twentieth of the fixed threshold
    (tr,) = [e for e in events if e.kind == "transition"]
    assert (tr.step, tr.completed_step, tr.reading, tr.label) == (
        3800, 3700, "sigma_ratio,log_volume", "generalising",
    )  # fmt: skip
    assert lo <= tr.step <= hi


def test_quiet_threshold_leaves_a_noisy_ratio_alone() -> None:
    """lambda_ratio's spread is about 0.9 decades: 40 robust sigmas are far above 2
    decades, so its threshold stays at ratio_decades and its events are the same."""

    def ratio_events(events: list[Event]) -> list[tuple[int, str]]:
        return [(e.step, e.kind) for e in events if e.reading == "lambda_ratio"]

    fixed, quiet = _events(EventConfig.from_dict(FIXED)), _events(EventConfig())
    assert ratio_events(quiet) == ratio_events(fixed) != []


def test_pure_path_agrees() -> None:
    history = [(s, p) for s, p in _history() if s <= 3400]
    steps = [s for s, _ in history]
    quiet = detect_level_shifts(history, EventConfig(), steps=steps)
    (fall,) = [e for e in quiet if e.kind == "collapse"]
    assert (fall.step, fall.reading) == (3400, "sigma_ratio")
    fixed = detect_level_shifts(history, EventConfig.from_dict(FIXED), steps=steps)
    assert [(e.kind, e.reading) for e in fixed] == [("revival", "log_volume")]


def test_quiet_threshold_config() -> None:
    cfg = EventConfig()
    assert (cfg.ratio_decades, cfg.ratio_mad_k, cfg.ratio_min_decades) == (2.0, 40.0, 0.05)
    for data in (FIXED, {"ratio_mad_k": 30, "ratio_min_decades": 0.1}):
        cfg = EventConfig.from_dict(data)
        assert EventConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match=r"ratio_mad_k must be >= 0, got -1\.0"):
        EventConfig.from_dict({"ratio_mad_k": -1.0})
    with pytest.raises(ConfigError, match=r"ratio_min_decades must be positive, got 0\.0"):
        EventConfig.from_dict({"ratio_min_decades": 0.0})
    # a least threshold at or above ratio_decades leaves the threshold at ratio_decades:
    # the fixed rule again, whatever the spread
    assert _events(EventConfig(ratio_decades=0.01)) != []
    high = [(e.step, e.kind, e.reading) for e in _events(EventConfig(ratio_min_decades=3.0))]
    assert high == [(e.step, e.kind, e.reading) for e in _events(EventConfig.from_dict(FIXED))]
