"""``compute_signatures``: per-layer Dead-Direction Signatures from one probe pass.

The engine composes the steps and knows nothing of files, MLflow or terminals::

    model copy (float64, eval)  ->  probe pass (X, Delta per layer)      ddsmon.probe
                                    over micro-batches of samples, each
                                    layer's running R factors            ddsmon.streaming
                                ->  spectra of X and G, floors           ddsmon.spectra
                                ->  K of each module's own parameters    ddsmon.param_gram
                                    (strategy per layer type: its registry)
                                ->  LayerSignature per layer             ddsmon.signature

Reference: Shirodkar & Narayanan (2026), "Dead-Direction Signatures: A Cheap Spectral
Reading of Singular Complexity", arXiv 2606.21158: Figure 2 (lambda+_min at a bottleneck),
Figure 4 (log det+ slope counts dead directions), Figure 7 (the fp64 / no-ridge /
smallest-positive recipe).

Example::

    >>> import torch
    >>> from torch import nn
    >>> from ddsmon import compute_signatures
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <...>
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    >>> x, y = torch.randn(64, 4), torch.randint(0, 3, (64,))
    >>> sig = compute_signatures(model, x, y, loss="ce")
    >>> list(sig.layers)
    ['0', '1', '2']
    >>> sig.layers["0"].g_rank <= 8
    True
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ddsmon import streaming
from ddsmon.errors import ConfigError, ProbeError
from ddsmon.losses import LossSpec, check_scored, per_sample_loss_fn, warn_if_copying
from ddsmon.options import (
    DEFAULT_FISHER,
    DEFAULT_LOSS,
    DEFAULT_MAX_WIDTH,
    DEVICE_AUTO,
    FISHER_FAMILIES,
    FORWARD_DTYPES,
)
from ddsmon.param_gram import (
    FunctionalGram,
    ParamGramStrategy,
    StructuredGram,
    own_parameters,
    param_gram_strategy,
    param_gram_structured,
    param_grams_functional,
)
from ddsmon.probe import probe_batch_size, select_layers
from ddsmon.signature import LayerSignature, Signatures, loss_spread, resolved_samples
from ddsmon.spectra import SingularReading, gram_of_rows, read_gram, read_singular_values
from ddsmon.streaming import LayerStream, LayerStreams, StreamedProbe, release_freed_memory

__all__ = ("FISHER_FAMILIES", "compute_signatures", "forward_dtype", "resolve_device")

log = logging.getLogger(__name__)


#: Worker threads that read the layers' decompositions side by side on CPU
#: (:func:`_read_layers`): None is the calling thread's torch thread count, 1 reads them
#: one after another.
LAYER_WORKERS: int | None = None

#: The probe-pass dtypes by setting name (:data:`ddsmon.options.FORWARD_DTYPES`).
_FORWARD_DTYPES: dict[str, torch.dtype] = {name: getattr(torch, name) for name in FORWARD_DTYPES}


def forward_dtype(name: str) -> torch.dtype:
    """The torch dtype of a probe-pass dtype setting, ``"float64"`` or ``"float32"``
    (:data:`ddsmon.options.FORWARD_DTYPES`); a ConfigError names any other value."""
    if name not in _FORWARD_DTYPES:
        raise ConfigError(f"forward dtype must be {' or '.join(FORWARD_DTYPES)}, got {name!r}")
    return _FORWARD_DTYPES[name]


def resolve_device(device: str | torch.device = DEVICE_AUTO) -> torch.device:
    """``"auto"`` is CUDA when torch sees it, else CPU; asking for absent CUDA, or for a
    ``cuda:K`` beyond the devices torch sees, is a ProbeError naming it."""
    if isinstance(device, str) and device == DEVICE_AUTO:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ProbeError(f"unknown device {device!r}: use auto, cpu or cuda[:k]") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ProbeError(
            f"device {device!r} asked for, but torch sees no CUDA device "
            f"(torch {torch.__version__}, cuda build: {torch.version.cuda})"
        )
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ProbeError(
            f"device {device!r} asked for, but torch sees {torch.cuda.device_count()} CUDA "
            f"device(s): cuda:0 to cuda:{torch.cuda.device_count() - 1}"
        )
    return dev


def _to_reading(obj: Any, device: torch.device, dtype: torch.dtype) -> Any:
    """Move a probe to the device; floating tensors take the reading dtype, ints stay."""
    if isinstance(obj, Tensor):
        obj = obj.to(device)
        return obj.to(dtype) if obj.is_floating_point() else obj
    if isinstance(obj, dict):
        return {k: _to_reading(v, device, dtype) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to_reading(v, device, dtype) for v in obj)
    return obj


def _matches(model: nn.Module, device: torch.device, dtype: torch.dtype) -> bool:
    tensors = [*model.parameters(), *model.buffers()]
    return all(
        t.device.type == device.type
        and (device.index is None or t.device.index == device.index)
        and (not t.is_floating_point() or t.dtype == dtype)
        for t in tensors
    )


def _type_name(obj: Any) -> str:
    kind = type(obj)
    return (
        kind.__qualname__
        if kind.__module__ == "builtins"
        else f"{kind.__module__}.{kind.__qualname__}"
    )


def _positive_int(name: str, value: int | None) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ProbeError(f"{name} must be a positive integer or None, got {value!r}")


def compute_signatures(
    model: nn.Module,
    inputs: Any,
    targets: Any,
    loss: LossSpec = DEFAULT_LOSS,
    layers: str | Sequence[str] | None = None,
    device: str | torch.device = DEVICE_AUTO,
    *,
    fisher: str = DEFAULT_FISHER,
    forward_dtype: torch.dtype = torch.float64,
    ridge: float = 0.0,
    max_probe_rows: int | None = None,
    max_width: int | None = DEFAULT_MAX_WIDTH,
    probe_batch: int | None = None,
    memory_budget: int | None = None,
    factor_budget: int | None = None,
) -> Signatures:
    """Read every selected layer's Dead-Direction Signature from one probe pass.

    Args:
        model: any ``nn.Module``; it is not modified (the pass runs on a copy in
            ``forward_dtype`` on ``device``, or on the model itself when it already is
            there, with its train/eval and ``requires_grad`` flags restored afterwards).
        inputs: a tensor (n, ...), a tuple of them (``model(*inputs)``) or a dict
            (``model(**inputs)``). Integer tensors (token ids) stay integer.
        targets: what ``loss`` compares the output with; first axis n (unused, and may
            be None, with ``fisher="none"``).
        loss: ``"ce"``, ``"mse"`` or ``callable(outputs, targets) -> (n,)``; see
            :mod:`ddsmon.losses` for the per-sample conventions. A callable must be
            per-sample (row i from sample i alone): the probe may be read in
            micro-batches.
        layers: None (every leaf module with a floating output of last dimension
            >= 2 and at most ``max_width``, dropout/identity excepted), a list of module
            names, or a regex.
        device: ``"auto"`` (CUDA if present), ``"cpu"``, ``"cuda"``; the spectra are
            computed there, in float64.
        fisher: ``"activation"`` (X and G), ``"parameter"`` (K), ``"both"``, or
            ``"none"``: no Fisher-Gram, X only, from forward passes without a loss, a
            graph or a backward pass (G and K readings are None).
        forward_dtype: dtype of the probe pass; float64 by default (the paper's recipe).
            With float32 the floors use float32's epsilon.
        ridge: Tikhonov term added to G and K before the eigensolve. Only for the
            recipe ablation of the paper's Figure 7: leave it 0.
        max_probe_rows: refuse (ProbeError) a layer with more rows N than this.
        max_width: the default selection (``layers`` None) leaves out layers whose
            output has more features d than this, named once in a warning: a language
            model's vocabulary head (:data:`~ddsmon.options.DEFAULT_MAX_WIDTH`), whose
            decompositions cost about 2 N^2 d. None reads every width; named layers are
            read whatever their width.
        probe_batch: samples per micro-batch of the streamed probe pass
            (:mod:`ddsmon.streaming`); None (default) sizes them from ``memory_budget``.
            A value of n or more reads the probe in one pass.
        memory_budget: bytes one micro-batch's autograd graph may hold, as measured on
            one sample before the pass; None is
            :data:`~ddsmon.streaming.DEFAULT_MEMORY_BUDGET` (1 GiB). A probe whose
            graph fits is read in one pass.
        factor_budget: bytes of per-layer state one pass holds (X's and Delta's R
            factors, the A and Delta rows of K from structure, summed over the layers
            read at once); the layers beyond it are read in further passes, a group
            at a time (:class:`~ddsmon.streaming.LayerStreams`). None is
            :data:`~ddsmon.streaming.DEFAULT_FACTOR_BUDGET` (4 GiB).

    Returns:
        :class:`~ddsmon.signature.Signatures`; ``.layers[name]`` is a LayerSignature,
        ``.sample_losses`` the per-sample losses the pass differentiated (n,) and
        ``.output_layer`` the layer carrying ``loss_spread`` (their spread,
        :func:`ddsmon.signature.loss_spread`), the last layer read to run in the forward
        pass.

    Definitions, for layer l (see :mod:`ddsmon.signature`): ``X`` (N x d) outputs,
    ``Delta`` (N x d) per-sample output gradients, ``G = Delta^T Delta / n`` (built on
    the smaller side), ``K = J J^T / n`` (n x n, J the per-sample gradients of the
    module's own parameters, built by the strategy registered for the module's type:
    :func:`ddsmon.param_gram.register_param_gram`); floors
    ``floor_x = max(N, d) eps sigma_max`` and ``floor_g = dim eps lambda_max``; readings
    are the values above the floors. A probe read in micro-batches gives the same
    readings to rounding: X and Delta enter through running R factors with the same
    ``X^T X`` and ``Delta^T Delta`` (see :mod:`ddsmon.streaming` for why it is exact).
    """
    started = time.perf_counter()
    if not isinstance(model, nn.Module):
        raise ProbeError(f"model must be a torch.nn.Module, got {_type_name(model)}")
    if fisher not in FISHER_FAMILIES:
        raise ProbeError(f"fisher must be one of {FISHER_FAMILIES}, got {fisher!r}")
    if forward_dtype not in (torch.float64, torch.float32):
        raise ProbeError(
            f"forward_dtype must be torch.float64 or torch.float32, got {forward_dtype}"
        )
    _positive_int("max_width", max_width)
    _positive_int("probe_batch", probe_batch)
    _positive_int("memory_budget", memory_budget)
    _positive_int("factor_budget", factor_budget)
    dev = resolve_device(device)
    n = probe_batch_size(inputs, targets)
    model = _eager(model)
    names = select_layers(model, layers)
    loss_fn = per_sample_loss_fn(loss)
    warn_if_copying(loss, inputs, targets)
    eps = torch.finfo(forward_dtype).eps
    want_activation = fisher in ("both", "activation")
    want_param = fisher in ("both", "parameter")
    backward = fisher != "none"
    if backward:
        check_scored(loss, targets)

    flags = {m: m.training for m in model.modules()}
    in_place = _matches(model, dev, forward_dtype)
    work = model if in_place else copy.deepcopy(model).to(device=dev, dtype=forward_dtype)
    try:
        work.eval()
        x = _to_reading(inputs, dev, forward_dtype)
        y = _to_reading(targets, dev, forward_dtype)
        strategies = _Strategies(want_param)
        probe = StreamedProbe(
            work,
            x,
            y,
            loss_fn,
            n=n,
            max_rows=max_probe_rows,
            max_width=max_width,
            backward=backward,
            probe_batch=probe_batch,
            memory_budget=memory_budget or streaming.DEFAULT_MEMORY_BUDGET,
        )

        def streams_of(budget: int | None) -> LayerStreams:
            return LayerStreams(
                n,
                x=want_activation or not backward,
                g=want_activation,
                factors=strategies.keeps_inputs,
                budget=budget,
            )

        def read(streams: LayerStreams, chosen: list[str]) -> dict[str, dict[str, Any]]:
            kept = [name for name in chosen if name in streams.layers]
            return _read_layers(
                streams.layers, kept, dev, n, eps, ridge, want_activation, not backward, strategies
            )

        first = streams_of(factor_budget or streaming.DEFAULT_FACTOR_BUDGET)
        chosen = probe.run(names, first, keep_inputs=first.keeps_inputs, strict=names is not None)
        fields = read(first, chosen)
        for group in first.deferred_groups():  # each within the budget (or one layer)
            if dev.type == "cpu":
                release_freed_memory()  # the last group's rows, freed, back to the system
            more = streams_of(None)
            group = probe.run(group, more, keep_inputs=more.keeps_inputs, strict=True)
            fields.update(read(more, group))
        fields = {name: fields[name] for name in chosen if name in fields}
        bad = {name for name, f in fields.items() if not f.get("finite", True)}
        if want_param:
            _read_functional(work, x, y, loss_fn, n, eps, ridge, fields, bad, strategies)
        losses = None if probe.losses is None else probe.losses.to(torch.float64).cpu().numpy()
        output = probe.output_layer if probe.output_layer in fields else None
        if losses is not None and output is not None and output not in bad:
            fields[output]["loss_spread"] = loss_spread(losses, eps)
            fields[output]["samples_resolved"] = resolved_samples(losses, fields[output]["d"], eps)
    finally:
        if in_place:
            for module, training in flags.items():
                module.training = training
    log.debug(
        "probe read in %d pass(es), %d micro-batch(es) of up to %s samples",
        probe.passes,
        probe.micro_batches,
        probe.batch,
    )
    return Signatures(
        layers={name: LayerSignature(**f) for name, f in fields.items()},
        n=n,
        device=str(dev),
        forward_dtype=str(forward_dtype).removeprefix("torch."),
        fisher=fisher,
        loss=loss if isinstance(loss, str) else getattr(loss, "__name__", "callable"),
        seconds=time.perf_counter() - started,
        sample_losses=losses,
        output_layer=output,
    )


class _Strategies:
    """How K of each module is built, decided once per module from the registry of
    :mod:`ddsmon.param_gram`: None (no K: not asked for, or no parameters of its own),
    a structured strategy (the probe pass keeps the module's input A) or FUNCTIONAL."""

    def __init__(self, want_param: bool) -> None:
        self.want_param = want_param
        self._decided: dict[int, ParamGramStrategy | None] = {}  # by id(module)

    def of(self, module: nn.Module) -> ParamGramStrategy | None:
        key = id(module)
        if key not in self._decided:
            self._decided[key] = param_gram_strategy(module) if self.want_param else None
        return self._decided[key]

    def keeps_inputs(self, module: nn.Module) -> bool:
        return isinstance(self.of(module), StructuredGram)


#: The parts of a layer's reading, each a task of its own when layers are read side by
#: side: ``"x"`` the SVD of X, ``"g"`` G's eigensolve, ``"k"`` K's build and eigensolve.
#: A layer's fields are put together once its last part is read.
_PARTS = ("x", "g", "k")

#: A task of :func:`_read_layers`: (layer name, part).
_Task = tuple[str, str]


def _read_layers(
    streams: dict[str, LayerStream],
    names: list[str],
    device: torch.device,
    n: int,
    eps: float,
    ridge: float,
    want_activation: bool,
    x_only: bool,
    strategies: _Strategies,
) -> dict[str, dict[str, Any]]:
    """The LayerSignature fields of every layer of ``names``, in that order.

    A layer's reading is up to three independent decompositions (:data:`_PARTS`: X's
    SVD, G's eigensolve, K's build and eigensolve, :func:`_read_part`), put together
    by :func:`_layer_fields` once the last is read. Each layer's stream is taken out of
    ``streams`` and dropped once its parts are read (so a reading holds the rows of
    the layers not read yet, no more).

    On CPU, when the calling thread has k > 1 torch threads (the thread policy's count
    for this reading, :mod:`ddsmon.threads`), the parts of all layers are read by k
    worker threads of one torch thread each, costliest first (:func:`_part_cost`),
    instead of one after another on k threads. The decompositions are dense LAPACK
    (Householder tridiagonalisation and bidiagonalisation: level-2 BLAS at their core),
    which gains little from a second thread (a 512 x 512 ``eigvalsh`` took 17.1 ms on 1
    thread and 15.6 ms on 2, on 2 cores), while two of them side by side take about the
    time of one. Parts rather than whole layers are the tasks because one layer (a
    hidden Linear with its X, G and K) can cost as much as all the others together:
    on the ``bench_llc`` shape (embedding 128, hidden 256, probe 512) whole layers side
    by side left one worker with 43 ms of the hidden layer while the other read the
    rest. Each part is the same calls as when read one after another on one thread,
    so the readings are those to rounding (a product or a decomposition on one thread
    may differ from one on two in the last bits: ``tests/test_engine_concurrency.py``).
    Elsewhere (CUDA), and on one thread, the layers are read in order, part after part,
    on the calling thread. A registered :class:`~ddsmon.param_gram.StructuredGram` may
    therefore run in a worker thread, beside another part of the same layer.

    The workers are daemon threads (a process stopping, a second Ctrl-C, does not wait
    for the parts left), and each reads with autograd off, as the calling thread does
    (grad mode is per thread). A failed part stops the parts after it (in ``names``
    order, then part order) from starting, and the failure first in that order is
    raised, as reading them in order would.
    """
    decided = {name: strategies.of(streams[name].module) for name in names}  # this thread
    held = {name: streams.pop(name) for name in names}
    parts = {name: _parts_of(held[name], want_activation, x_only, decided[name]) for name in names}
    read_parts: dict[str, dict[str, Any]] = {name: {} for name in names}
    left = {name: len(parts[name]) for name in names}
    fields: dict[str, dict[str, Any]] = {}
    lock = threading.Lock()

    def finish(name: str) -> None:
        stream = held.pop(name)
        with torch.no_grad():
            fields[name] = _layer_fields(stream, n, read_parts.pop(name))

    def read(task: _Task) -> None:
        name, part = task
        with torch.no_grad():
            result = _read_part(held[name], part, n, eps, ridge, decided[name])
        with lock:
            got = read_parts[name]
            got[part] = result
            pair = part in ("x", "g") and "x" in got and "g" in got
        if pair:
            # u_dead_gain needs X's dead direction and G's Delta factor: taken as soon as
            # both are read, so that the factor (all N x d rows of Delta, where they were
            # kept for K) is not held until the layer's last part
            gram, delta = got["g"]
            with torch.no_grad():
                gain = _dead_direction_gain(got["x"], delta, n)
            del delta
        with lock:
            if pair:
                got["g"], got["gain"] = (gram, None), gain
            left[name] -= 1
            last = left[name] == 0
        if last:
            finish(name)

    for name in names:
        if not parts[name]:
            finish(name)
    tasks = [(name, part) for name in names for part in parts[name]]
    threads = torch.get_num_threads()
    most = threads if LAYER_WORKERS is None else LAYER_WORKERS
    workers = min(most, len(tasks)) if device.type == "cpu" else 1
    if workers <= 1:
        for task in tasks:
            read(task)
        return {name: fields[name] for name in names}
    costs = {task: _part_cost(held[task[0]], task[1], n) for task in tasks}
    try:
        _side_by_side(read, sorted(tasks, key=lambda task: -costs[task]), workers, tasks)
    finally:
        # the workers' set_num_threads(1) also set ATen's process-wide count, the one a
        # thread started later begins with: put back this thread's
        torch.set_num_threads(threads)
    return {name: fields[name] for name in names}


def _side_by_side(
    read: Callable[[_Task], None], queue: list[_Task], workers: int, order: list[_Task]
) -> None:
    """``read(task)`` for every task of ``queue``, taken in turn by ``workers`` daemon
    threads of one torch thread each; re-raises the failure first in ``order``. Once a
    task failed, only the tasks before it in ``order`` are still read (one of them may
    fail too, and reading in order would have raised that one)."""
    pending = iter(queue)
    rank = {task: i for i, task in enumerate(order)}
    lock = threading.Lock()
    failed: dict[_Task, BaseException] = {}

    def work() -> None:
        torch.set_num_threads(1)
        while True:
            with lock:
                task = next(pending, None)
                while task is not None and failed and rank[task] > min(rank[t] for t in failed):
                    task = next(pending, None)
            if task is None:
                return
            try:
                read(task)
            except BaseException as exc:  # re-raised on the calling thread
                with lock:
                    failed[task] = exc

    team = [
        threading.Thread(target=work, name=f"ddsmon-layer-{i}", daemon=True) for i in range(workers)
    ]
    for thread in team:
        thread.start()
    for thread in team:
        thread.join()
    if failed:
        raise failed[min(failed, key=rank.__getitem__)]


def _parts_of(
    stream: LayerStream, want_activation: bool, x_only: bool, strategy: ParamGramStrategy | None
) -> list[str]:
    """The parts (:data:`_PARTS`) of this layer's reading: ``want_activation``, X and G;
    ``x_only`` (a forward-only pass), X alone; K where ``strategy`` is structured and
    this pass kept the layer's A and Delta rows (else K is read by ``torch.func``,
    :func:`_read_functional`). None for a
    layer whose activations or gradients were not finite."""
    if stream.nonfinite is not None:
        return []
    wanted = {
        "x": want_activation or x_only,
        "g": want_activation,
        "k": isinstance(strategy, StructuredGram) and bool(stream.factors),
    }
    return [part for part in _PARTS if wanted[part]]


def _part_cost(stream: LayerStream, part: str, n: int) -> float:
    """A part's decomposition in flops, roughly (it orders the tasks, nothing more):
    X's SVD after a QR on its ``min(N, d)`` square (``2 large small^2 + 8 small^3``),
    G's eigensolve on its smaller side after building it (``4/3 small^3 + large
    small^2``), K's (n x n, ``4/3 n^3``) after its two n x n products (``4 n^2 d``).
    Measured on one thread on the ``bench_llc`` shape: 9.8, 3.3 and about 15 ms."""
    small, large = sorted((stream.rows, stream.width))
    if part == "x":
        return 2 * large * small * small + 8 * small**3
    if part == "g":
        return 4 * small**3 / 3 + large * small * small
    return 4 * n**3 / 3 + 4 * n * n * stream.width


def _read_part(
    stream: LayerStream,
    part: str,
    n: int,
    eps: float,
    ridge: float,
    strategy: ParamGramStrategy | None,
) -> Any:
    """One part of a layer's reading: ``"x"`` X's :class:`~ddsmon.spectra.SingularReading`;
    ``"g"`` G's :class:`~ddsmon.spectra.GramReading` and the Delta factor it came from
    (``M`` with ``M^T M = Delta^T Delta``, :mod:`ddsmon.streaming`); ``"k"`` the
    ``param_*`` fields (:func:`_param_fields`) of K from structure (None where the
    layer kept no rows)."""
    if part == "x":
        return read_singular_values(stream.x_matrix(), eps, rows=stream.rows)
    if part == "g":
        delta = stream.delta_matrix()
        return read_gram(gram_of_rows(delta, n), eps, ridge), delta
    assert isinstance(strategy, StructuredGram)
    cap = stream.factor_capture()
    if cap is None:
        return None
    return _param_fields(param_gram_structured(cap, n, strategy=strategy), cap.module, eps, ridge)


def _dead_direction_gain(xs: SingularReading, delta: Tensor, n: int) -> float | None:
    """``u_dead_gain = u^T G u = |M u|^2 / n``: G at X's dead direction u (the unit right
    singular vector at ``sigma_min``), from G's Delta factor M (``M^T M = Delta^T
    Delta``); None where X resolves nothing."""
    if xs.u_dead is None:
        return None
    return float((delta @ xs.u_dead).pow(2).sum() / n)


def _layer_fields(stream: LayerStream, n: int, parts: dict[str, Any]) -> dict[str, Any]:
    """The LayerSignature fields of one layer from its read parts (:func:`_read_part`)
    and ``"gain"``, its ``u_dead_gain`` (:func:`_dead_direction_gain`, taken once both
    ``"x"`` and ``"g"`` were read)."""
    d = stream.width
    fields: dict[str, Any] = {"name": stream.name, "n": n, "N": stream.rows, "d": d}
    if stream.nonfinite is not None:
        return {**fields, "finite": False, "nonfinite": stream.nonfinite}
    xs = parts.get("x")
    if xs is not None:
        fields.update(
            sigma_min=xs.sigma_min,
            sigma_max=xs.sigma_max,
            x_rank=xs.rank,
            x_dead=d - xs.rank,
            floor_x=xs.floor,
            x_spectrum=xs.values.cpu().numpy(),
        )
    if "g" in parts:
        gram, _ = parts["g"]
        fields.update(
            lambda_min=gram.lambda_min,
            lambda_max=gram.lambda_max,
            g_rank=gram.rank,
            g_dead=d - gram.rank,
            floor_g=gram.floor,
            logdet=gram.logdet,
            log_volume=gram.log_volume,
            u_dead_gain=parts.get("gain"),
            g_spectrum=gram.values.cpu().numpy(),
        )
    if parts.get("k") is not None:
        fields.update(parts["k"])
    return fields


def _param_fields(k: Tensor, module: nn.Module, eps: float, ridge: float) -> dict[str, Any]:
    """The ``param_*`` fields from K (n x n)."""
    pr = read_gram(k, eps, ridge)
    return {
        "param_count": sum(p.numel() for _, p in own_parameters(module)),
        "param_lambda_min": pr.lambda_min,
        "param_lambda_max": pr.lambda_max,
        "param_rank": pr.rank,
        "param_floor": pr.floor,
        "param_logdet": pr.logdet,
        "param_log_volume": pr.log_volume,
        "param_spectrum": pr.values.cpu().numpy(),
    }


def _eager(model: nn.Module) -> nn.Module:
    """The module ``torch.compile`` wrapped (``OptimizedModule._orig_mod``), else
    ``model``: the probe pass runs eagerly, with hooks on the modules, in float64, and
    compiling that pass (once per dtype, per hook set and per micro-batch shape) took
    30 s for a 3-layer MLP on two cores, for nothing: each pass runs once. The layers
    are then named as in the eager model (``0``, not ``_orig_mod.0``), as the
    checkpoint's keys are once their ``_orig_mod.`` is stripped."""
    while type(model).__name__ == "OptimizedModule":
        inner = getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            break
        model = inner
    return model


def _read_functional(
    work: nn.Module,
    x: Any,
    y: Any,
    loss_fn: Any,
    n: int,
    eps: float,
    ridge: float,
    fields: dict[str, dict[str, Any]],
    bad: set[str],
    strategies: _Strategies,
) -> None:
    """K by ``torch.func`` for the read layers whose type has no structured strategy."""
    others = {
        name: module
        for name in fields
        if name not in bad
        and isinstance(strategies.of(module := work.get_submodule(name)), FunctionalGram)
    }
    if not others:
        return
    try:
        grams = param_grams_functional(work, others, x, y, loss_fn, n)
    except Exception as exc:  # torch.func cannot trace every module
        log.warning("parameter-side Gram via torch.func failed for %s: %s", sorted(others), exc)
        return
    for name, k in grams.items():
        fields[name].update(_param_fields(k, others[name], eps, ridge))
