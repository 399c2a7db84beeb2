"""A pytest plugin that makes every ``compute_signatures`` call stream, at its smallest.

    PYTHONPATH=tests .venv/bin/python -m pytest -p streaming_forced \\
        $(ls tests/test_engine_*.py | grep -v streaming) tests/test_param_gram_registry.py

With it, the default ``memory_budget`` is 1 byte (micro-batches of 2 samples, then 1),
a :class:`~ddsmon.streaming.RowFactor` folds as soon as it holds more than d rows, and
the default ``factor_budget`` is 1 byte (each layer read in a pass of its own):
every path of :mod:`ddsmon.streaming` runs under the engine's existing tests.
Tests that pass their own ``probe_batch`` or budgets keep them. Expected to fail:
``test_engine_streaming.py`` (it tests these defaults) and
``test_loss_of_the_wrong_shape_is_named[too-short]``, whose loss keeps the first 5 rows
of the batch: not a per-sample loss, which micro-batches of fewer samples cannot tell.
"""

from __future__ import annotations

import pytest

from ddsmon import streaming


@pytest.fixture(autouse=True)
def _streaming_forced(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(streaming, "DEFAULT_MEMORY_BUDGET", 1)
    monkeypatch.setattr(streaming, "DEFAULT_FACTOR_BUDGET", 1)
    monkeypatch.setattr(streaming, "FOLD_BYTES", 1)
