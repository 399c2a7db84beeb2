"""The :class:`Reader`: read settings resolved once into the parts that read a checkpoint.

``report``, ``scan`` and ``watch`` read checkpoints only through a Reader::

    ReadSettings (specs: "pkg:make", "probe.pt", "ce")
        -> Reader: factory, probe (inputs, targets, n), loss callable, device, dtype,
                   thread policy, layer spec, recipe, streaming budgets
        -> reader.load(ref)  -> LoadedCheckpoint          ddsmon.loading
        -> reader.read(model) -> Signatures               ddsmon.engine.compute_signatures
                                 on the policy's threads  ddsmon.threads

Everything that can be checked before the first checkpoint is checked at construction
(factory importable, probe readable and batch-consistent, loss known, device present,
dtype known, threads a count) and raises :class:`~ddsmon.errors.ConfigError`. Python
callers and tests hand resolved parts (a factory callable, a probe pair, a loss
callable) to :meth:`Reader.from_parts` instead of ``MODULE:NAME`` strings.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ddsmon import __version__
from ddsmon.checkpoints import CheckpointRef
from ddsmon.config import ReadSettings, layer_names
from ddsmon.engine import compute_signatures, forward_dtype, resolve_device
from ddsmon.errors import ConfigError, DDSError
from ddsmon.loading import LoadedCheckpoint, load_checkpoint, load_probe, resolve_callable
from ddsmon.loading import resolve_factory as _resolve_factory
from ddsmon.losses import kept_torch_modes
from ddsmon.options import BUILTIN_LOSSES
from ddsmon.probe import probe_batch_size
from ddsmon.signature import Signatures
from ddsmon.streaming import DEFAULT_FACTOR_BUDGET, DEFAULT_MEMORY_BUDGET
from ddsmon.threads import ThreadPolicy, check_threads

__all__ = ("Reader", "limit_threads", "resolve_layers", "resolve_loss")

log = logging.getLogger(__name__)

#: How the readings are computed (paper Figure 7), as recorded in the run's params.
RECIPE = "{dtype} probe pass, float64 spectra, no ridge, smallest positive above floor dim*eps*max"


@dataclass
class Reader:
    """Resolved read settings: the one thing that reads a checkpoint.

    factory: zero-argument callable returning the model (None: Hugging Face folders build
        theirs from ``config.json``; a checkpoint of another kind then fails to load).
    inputs / targets: the probe batch, ``n`` samples.
    loss: ``"ce"``, ``"mse"`` or a per-sample loss callable ``(outputs, targets) -> (n,)``.
    threads: the thread policy of each reading (:mod:`ddsmon.threads`), from the
        ``threads`` setting; ``last_threads`` is the count the last reading ran on.
    """

    settings: ReadSettings
    factory: Callable[[], nn.Module] | None
    inputs: Any
    targets: Any
    loss: str | Callable[..., Any]
    device: torch.device
    dtype: torch.dtype
    n: int = field(init=False)
    threads: ThreadPolicy = field(init=False)
    last_threads: int | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self.n = probe_batch_size(self.inputs, self.targets)
        self.threads = ThreadPolicy.from_setting(self.settings.threads)

    # -------------------------------------------------------------- construction
    @classmethod
    def from_settings(cls, settings: ReadSettings) -> Reader:
        """Resolve every spec of ``settings``; ConfigError on the first that fails."""
        if settings.probe is None:
            raise ConfigError("no probe: give --probe FILE or --probe MODULE:FUNCTION")
        factory = _resolve_factory(settings.model) if settings.model else None
        inputs, targets = load_probe(settings.probe, trust=settings.trust_checkpoints)
        return cls.from_parts(settings, factory=factory, probe=(inputs, targets))

    @classmethod
    def from_parts(
        cls,
        settings: ReadSettings | None = None,
        *,
        factory: Callable[[], nn.Module] | None = None,
        probe: tuple[Any, Any],
        loss: str | Callable[..., Any] | None = None,
    ) -> Reader:
        """A Reader from resolved parts; what is not given comes from ``settings``."""
        settings = settings or ReadSettings()
        return cls(
            settings=settings,
            factory=factory,
            inputs=probe[0],
            targets=probe[1],
            loss=loss if loss is not None else resolve_loss(settings.loss),
            device=_device(settings.device),
            dtype=forward_dtype(settings.forward_dtype),
        )

    # -------------------------------------------------------------- reading
    def load(self, ref: CheckpointRef) -> LoadedCheckpoint:
        """Load ``ref`` into the model (CPU, eval mode); CheckpointError on failure, and
        ConfigError when the factory's model cannot hold weights (:func:`_materialised`)."""
        factory = self.factory
        if factory is not None:
            factory = _Materialised(factory)
        return load_checkpoint(ref, factory, trust=self.settings.trust_checkpoints)

    def read(self, model: nn.Module) -> Signatures:
        """Every selected layer's readings of ``model`` on the probe (one probe pass, in
        micro-batches when the settings' budgets say so), on the policy's threads."""
        s = self.settings
        with self.threads.reading() as threads:
            self.last_threads = threads
            return compute_signatures(
                model,
                self.inputs,
                self.targets,
                loss=self.loss,
                layers=resolve_layers(model, s.layers),
                device=self.device,
                fisher=s.fisher,
                forward_dtype=self.dtype,
                max_probe_rows=s.max_probe_rows,
                max_width=s.max_width,
                probe_batch=s.probe_batch,
                memory_budget=s.memory_budget,
                factor_budget=s.factor_budget,
            )

    def automatic_params(self) -> set[str]:
        """The keys of :meth:`params` whose values this process chose itself, not a
        user's setting: ``torch_threads`` without ``--threads`` (each process picks the
        count from the cores free when it starts). A run read again with another count
        is no conflict to warn of (:class:`~ddsmon.sinks.RunInfo` ``automatic``)."""
        return {"torch_threads"} if self.threads.threads is None else set()

    def params(self) -> dict[str, str]:
        """The settings of the reading, as MLflow params."""
        s = self.settings
        return {
            "ddsmon_version": __version__,
            "probe_size": str(self.n),
            "probe": str(s.probe),
            "model": str(s.model),
            "loss": s.loss,
            "layers": s.layers
            or f"default (leaf modules with outputs of width 2 to {s.max_width})",
            "fisher": s.fisher,
            "recipe": RECIPE.format(dtype=s.forward_dtype),
            "device": str(self.device),
            "torch_threads": str(self.threads.threads or self.threads.threads_for_reading()[0]),
            "threads_policy": self.threads.description,
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "unset (OpenMP's default)"),
            "probe_batch": str(s.probe_batch or "auto (from memory_budget)"),
            "memory_budget": _bytes(s.memory_budget, DEFAULT_MEMORY_BUDGET),
            "factor_budget": _bytes(s.factor_budget, DEFAULT_FACTOR_BUDGET),
        }


class _Materialised:
    """The model factory, whose model is refused when its tensors are on the ``meta``
    device (``with torch.device("meta")``, ``init_empty_weights``): they hold no data,
    so loading a checkpoint into them is a no-op (torch warns once per tensor) and the
    reading fails further on with "Cannot copy out of meta tensor"."""

    def __init__(self, factory: Callable[[], nn.Module]) -> None:
        self.factory = factory

    def __call__(self) -> nn.Module:
        with kept_torch_modes(f"model factory {self._label()}"):
            model = self.factory()
        if isinstance(model, nn.Module):
            meta = [
                name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta
            ]
            if meta:
                shown_names = ", ".join(meta[:3]) + (", ..." if len(meta) > 3 else "")
                raise ConfigError(
                    f"model factory {self._label()} built a model with "
                    f"{len(meta)} tensors on the meta device ({shown_names}): they hold no data, and a checkpoint "
                    "cannot be loaded into them; build it on the CPU (ddsmon moves it to "
                    "--device), or return model.to_empty(device='cpu')"
                )
        return model

    def _label(self) -> str:
        spec = getattr(self.factory, "spec", None)
        label = repr(spec) if spec else getattr(self.factory, "__qualname__", "")
        return label or repr(self.factory)

    def __repr__(self) -> str:
        return repr(self.factory)


def _bytes(value: int | None, default: int) -> str:
    """A byte budget as recorded: ``1073741824`` or ``1073741824 (default)``."""
    return f"{default} (default)" if value is None else str(value)


def _device(spec: str) -> torch.device:
    try:
        return resolve_device(spec)
    except DDSError as exc:
        raise ConfigError(str(exc)) from exc


def limit_threads(threads: int | None) -> None:
    """``--threads N`` / ``threads = N``: torch's intra-op CPU threads for this process
    (``torch.set_num_threads``; the eigensolvers and matrix products run on these).
    None leaves the process as it is (each reading then picks its own count:
    :class:`ddsmon.threads.ThreadPolicy`)."""
    threads = check_threads(threads)
    if threads is not None:
        torch.set_num_threads(threads)


def resolve_loss(spec: str) -> str | Callable[..., Any]:
    """``--loss``: ``ce``, ``mse``, or ``MODULE:FUNCTION`` naming a per-sample loss callable."""
    if spec in BUILTIN_LOSSES:
        return spec
    if ":" not in spec:
        raise ConfigError(
            f"unknown loss {spec!r}: use {', '.join(BUILTIN_LOSSES)} or MODULE:FUNCTION"
        )
    return resolve_callable(spec, "loss")


def resolve_layers(model: nn.Module, spec: str | None) -> str | list[str] | None:
    """``--layers``: comma-separated module names (:func:`ddsmon.config.layer_names`),
    one exact name, or else a regex."""
    if not spec:
        return None
    listed = layer_names(spec)
    if listed is not None:
        return listed
    names = {name for name, _ in model.named_modules() if name}
    return [spec] if spec in names else spec
