"""The layers' decompositions read side by side (``engine._read_layers``): on CPU with
more than one torch thread, worker threads of one torch thread each read the layers,
costliest first; the readings are those of reading them one after another, and the
calling thread's thread count is left as it was."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from ddsmon import compute_signatures, engine
from ddsmon.errors import ProbeError
from ddsmon.param_gram import StructuredGram, register_param_gram, unregister_param_gram


class Doubler(nn.Module):
    """``h = 2 a W^T``: a module type of this test's own, with a registered strategy."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d_out, d_in) / d_in**0.5)

    def forward(self, x: Tensor) -> Tensor:
        return 2 * x @ self.weight.T


SEEN: list[tuple[str, int]] = []


def doubler_gram(module: nn.Module, a: Tensor, delta: Tensor, n: int) -> Tensor:
    """K of h = 2 a W^T: J_i = 2 delta_i (x) a_i, so K = 4 (A A^T) * (D D^T) / n."""
    SEEN.append((threading.current_thread().name, torch.get_num_threads()))
    return 4 * (a @ a.T) * (delta @ delta.T) / n


@pytest.fixture
def doubler() -> Iterator[None]:
    SEEN.clear()
    register_param_gram(Doubler, StructuredGram(doubler_gram))
    yield
    unregister_param_gram(Doubler)


@pytest.fixture
def two_threads() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)
    engine.LAYER_WORKERS = None


def _case() -> tuple[nn.Module, Tensor, Tensor]:
    torch.manual_seed(11)
    model = nn.Sequential(
        nn.Linear(12, 40), nn.Tanh(), Doubler(40, 24), nn.ReLU(), nn.Linear(24, 5)
    )
    return model, torch.randn(96, 12), torch.randint(0, 5, (96,))


_SCALARS = ("sigma_min", "sigma_max", "lambda_min", "lambda_max", "logdet", "u_dead_gain",
            "param_lambda_max", "param_logdet")  # fmt: skip
_COUNTS = ("x_rank", "g_rank", "param_rank")
_SPECTRA = ("x_spectrum", "g_spectrum", "param_spectrum")


def test_side_by_side_readings_equal_those_read_one_after_another(
    doubler: None, two_threads: None
) -> None:
    model, x, y = _case()
    engine.LAYER_WORKERS = 1
    torch.set_num_threads(1)  # one after another, each decomposition on one thread
    ordered = compute_signatures(model, x, y, loss="ce", device="cpu")
    assert {name for name, _ in SEEN} == {threading.current_thread().name}
    SEEN.clear()
    torch.set_num_threads(2)
    engine.LAYER_WORKERS = None
    side = compute_signatures(model, x, y, loss="ce", device="cpu")
    assert torch.get_num_threads() == 2  # the calling thread's count is left as it was
    # the user's strategy ran in a worker thread, on one torch thread
    assert len(SEEN) == 1 and SEEN[0][0].startswith("ddsmon-layer") and SEEN[0][1] == 1, SEEN
    assert list(side.layers) == list(ordered.layers) == ["0", "1", "2", "3", "4"]
    for name, got in side.layers.items():
        ref = ordered.layers[name]
        for key in _COUNTS:
            assert getattr(got, key) == getattr(ref, key), (name, key)
        for key in _SCALARS:
            a, b = getattr(got, key), getattr(ref, key)
            assert (a is None) == (b is None), (name, key)
            if a is not None:
                assert a == pytest.approx(b, rel=1e-10, abs=1e-300), (name, key)
        for key in _SPECTRA:
            a, b = getattr(got, key), getattr(ref, key)
            assert (a is None) == (b is None), (name, key)
            if a is not None:
                np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12 * float(np.max(b)))


def test_a_layer_that_fails_in_a_worker_fails_the_reading_by_name(
    doubler: None, two_threads: None
) -> None:
    """A strategy that raises in a worker thread is the same ProbeError, naming the
    layer, as when read on the calling thread; the thread count is restored."""

    def broken(module: nn.Module, a: Tensor, delta: Tensor, n: int) -> Tensor:
        raise RuntimeError("strategy bug")

    register_param_gram(Doubler, StructuredGram(broken))
    model, x, y = _case()
    with pytest.raises(ProbeError, match=r"'2'.*strategy bug|strategy bug.*'2'"):
        compute_signatures(model, x, y, loss="ce", device="cpu")
    assert torch.get_num_threads() == 2


def test_one_thread_reads_in_order_on_the_calling_thread(doubler: None, two_threads: None) -> None:
    torch.set_num_threads(1)
    model, x, y = _case()
    compute_signatures(model, x, y, loss="ce", device="cpu")
    assert SEEN == [(threading.current_thread().name, 1)]


def test_a_reading_under_no_grad_is_the_same_on_the_workers(
    doubler: None, two_threads: None
) -> None:
    """Grad mode is per thread: a caller's ``torch.no_grad()`` must not matter. A
    strategy built from the module's own weight (which requires grad) reads the same
    on the workers as on the calling thread, inside no_grad or not."""

    def weighted(module: nn.Module, a: Tensor, delta: Tensor, n: int) -> Tensor:
        scale = module.weight.norm() / module.weight.norm()  # 1, built from the weight
        return scale * doubler_gram(module, a, delta, n)

    register_param_gram(Doubler, StructuredGram(weighted))
    model, x, y = _case()
    engine.LAYER_WORKERS = 1
    ordered = compute_signatures(model, x, y, loss="ce", device="cpu")
    engine.LAYER_WORKERS = None
    with torch.no_grad():
        side = compute_signatures(model, x, y, loss="ce", device="cpu")
    assert side.layers["2"].param_rank == ordered.layers["2"].param_rank
    assert side.layers["2"].param_logdet == pytest.approx(ordered.layers["2"].param_logdet)


def test_the_workers_are_daemon_threads_and_the_first_failure_in_layer_order_is_raised(
    two_threads: None,
) -> None:
    """A stopping process does not wait for the layers left (daemon workers); when two
    layers fail, the error is the one of the layer first in model order, as in order."""
    daemon: list[bool] = []

    def record(module: nn.Module, a: Tensor, delta: Tensor, n: int) -> Tensor:
        daemon.append(threading.current_thread().daemon)
        raise RuntimeError(f"failed at width {delta.shape[1]}")

    class Other(Doubler):
        pass

    register_param_gram(Doubler, StructuredGram(record))
    register_param_gram(Other, StructuredGram(record))
    try:
        torch.manual_seed(5)
        model = nn.Sequential(Doubler(12, 40), nn.Tanh(), Other(40, 64), nn.Linear(64, 5))
        x, y = torch.randn(96, 12), torch.randint(0, 5, (96,))
        with pytest.raises(ProbeError, match="width 40"):
            compute_signatures(model, x, y, loss="ce", device="cpu")
    finally:
        unregister_param_gram(Doubler)
        unregister_param_gram(Other)
    assert daemon and all(daemon), daemon


def test_each_layer_s_rows_are_dropped_once_it_is_read(
    two_threads: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The streams of the layers already read are not kept while the others are read."""
    import gc

    from ddsmon.streaming import LayerStream

    alive: dict[str, int] = {}  # layer -> streams alive when its first part is read
    real = engine._read_part

    def counting(stream, *args):  # type: ignore[no-untyped-def]
        gc.collect()
        alive.setdefault(stream.name, sum(isinstance(o, LayerStream) for o in gc.get_objects()))
        return real(stream, *args)

    monkeypatch.setattr(engine, "_read_part", counting)
    engine.LAYER_WORKERS = 1
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))
    compute_signatures(model, torch.randn(20, 6), torch.randint(0, 3, (20,)), device="cpu")
    counts = list(alive.values())
    assert list(alive) == ["0", "1", "2", "3", "4"], alive
    assert counts == sorted(counts, reverse=True) and counts[0] - counts[-1] == 4, alive


def test_side_by_side_each_layer_s_delta_factor_is_dropped_once_its_gain_is_read(
    two_threads: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Read side by side (costliest first: here every X and G before any K), a layer's Delta
    factor (all N x d rows where they are kept for K) is let go once u_dead_gain is
    taken from it, not held until the layer's last part: at most the two in flight and
    one waiting for its X are alive at once, not one for every layer."""
    import gc
    import weakref

    from ddsmon.streaming import LayerStream

    made: list[weakref.ref[Tensor]] = []
    alive: list[int] = []
    real_delta, real_part = LayerStream.delta_matrix, engine._read_part

    def delta_matrix(self: LayerStream) -> Tensor:
        out = real_delta(self)
        made.append(weakref.ref(out))
        return out

    def counting(stream, *args):  # type: ignore[no-untyped-def]
        gc.collect()
        alive.append(sum(ref() is not None for ref in made))
        return real_part(stream, *args)

    monkeypatch.setattr(LayerStream, "delta_matrix", delta_matrix)
    monkeypatch.setattr(engine, "_read_part", counting)
    torch.manual_seed(3)
    model = nn.Sequential(*[nn.Linear(16, 16) for _ in range(8)])
    # 24 sequences of 16 positions: N = 384 rows a layer, so X and G cost more than K
    x, y = torch.randn(24, 16, 16), torch.randn(24, 16, 16)
    sig = compute_signatures(model, x, y, "mse", device="cpu", probe_batch=4)  # 6 micro-batches
    assert len(made) == 8 and all(s.u_dead_gain is not None for s in sig.layers.values())
    assert max(alive) <= 3, alive
