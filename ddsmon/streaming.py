"""The streamed probe pass: micro-batches of samples, a running factor per layer.

The probe pass (:mod:`ddsmon.probe`) of a whole probe holds its float64 autograd graph
at once: 11-13 GiB for a GPT-2-small-shaped model on 32 x 128 tokens. Here the probe is cut
into micro-batches of samples, each read by its own pass, and every layer keeps only
what its readings need, so the memory of a reading no longer grows with the probe.

**Why it is exact.** In eval mode sample i's forward pass does not depend on the other
samples, and ``loss_i`` depends on sample i alone, so for j in a micro-batch B::

    d (sum_{i in B} loss_i) / d h_j  =  d loss_j / d h_j

the same rows of Delta whatever else B holds (BatchNorm in eval mode uses its running
statistics; dropout is off). X's rows are the layer's outputs, equally per sample.
The rows of X, Delta and A arrive in sample order, a micro-batch at a time; what
differs from a whole-probe pass is rounding only (GEMMs over fewer rows).

**X and Delta: a running R factor (TSQR).** For a matrix Z (N x d) whose rows arrive in
blocks Z_1, Z_2, ..., :class:`RowFactor` holds M with ``M^T M = Z^T Z``:

* while at most d rows have arrived, M is the rows themselves (M = Z, nothing folded);
* after that, rows are buffered, and when the buffer passes ``fold_rows`` (a few d,
  within ``FOLD_BYTES``) it is folded: ``[M; buffer] = Q R`` (Householder QR, R only,
  d x d) and M <- R. Since ``Q^T Q = I``, ``R^T R = M^T M + buffer^T buffer``;

so M (at most ``d + fold_rows`` rows) has Z's singular values and right singular
vectors, and ``u^T Z^T Z u = ||M u||^2``, exactly in exact arithmetic. Householder QR
is backward stable (the computed R is the exact R of a matrix within about eps ||Z|| of
the stacked one), so each fold moves a singular value by about eps sigma_max, far
below the trust floor ``max(N, d) eps sigma_max``, where N is the total number of rows
(:func:`ddsmon.spectra.read_singular_values` takes it as ``rows``). For Delta the same
factor gives ``G = Delta^T Delta / n = M^T M / n`` (d x d; formed and eigensolved as
the whole-probe pass forms Delta^T Delta) and the dead-direction gain
``u^T G u = ||M u||^2 / n``, which keeps the accuracy of ``||Delta u||^2``: a sum of
accumulated ``Delta_k^T Delta_k`` would give ``u^T G u`` only to about
``d eps lambda_max`` (it can come out negative), too coarse for a gain that falls
by many decades at a dead direction.

**N < d.** When the whole probe has no more than d rows, nothing is folded: M is X
(or Delta) itself, N x d, and the readings are those of the whole-probe pass: G's
spectrum comes from the N x N row Gram ``Delta Delta^T / n`` (which cannot be built
from a d x d accumulation), X's from the QR of X^T. Such a layer's rows are small
(N d < d^2).

**The parameter-side Gram K** (n x n, :mod:`ddsmon.param_gram`) couples every pair of
samples, ``K_ij = <J_i, J_j> / n``, so it needs all samples' A and Delta rows of a layer
at once: ``N (d_in + d_out)`` numbers per structured layer (A is N token ids for an
Embedding), kept in the forward dtype. ``torch.func`` K (modules without a structured
strategy) is computed after the passes, as before (its J is n x p per module, chunked
by samples).

**The layers in groups.** What the layers hold through a pass (their R factors, and
the A and Delta rows for K) is bounded by ``factor_budget`` bytes (4 GiB by default):
the layers beyond it are read by further passes, a group within the budget at a time,
each group's decompositions read and its rows freed before the next pass
(:class:`LayerStreams`). Every extra pass is a full forward/backward (exact: the same
rows again). Without it a reading held every layer's state at once: 19.4 GiB on GPT-2
small's 73 default layers.

**The micro-batch size.** ``probe_batch`` samples if given; else the most samples
whose graph fits ``memory_budget`` bytes. That is measured before the probe pass, by
the forward pass and loss of one sample with the probe pass's hooks (no backward): the
bytes of the tensors its graph saves for backward
(``torch.autograd.graph.saved_tensors_hooks``, each storage once, parameters and
buffers excepted), plus three times the largest output of any module (what the
backward pass holds beside the graph: the gradients of that output and of the ops next
to it, the logits' and the log-softmax's for a language model). On a GPT-2-small-shaped
model (128 tokens a sample, float64) that is about 280 MiB a sample, and peak RSS grew
by about 300 MiB a sample of the micro-batch (3.4 GiB in all at the default budget,
against 11.5 GiB for the whole probe of 32 in one pass).
When the whole probe fits, it is read in one pass, exactly as without streaming.
Otherwise the first micro-batch has at least 2 samples (a module whose output does
not follow the batch, a broadcast (1, T, d) position embedding, is then not mistaken
for a per-sample one) and fixes the default layer selection for the rest.

**Per-sample losses.** Each micro-batch's pass keeps its samples' losses ``loss_i``
(:attr:`ddsmon.probe.ProbePass.losses`); :attr:`StreamedProbe.losses` is them in
sample order, (n,), exactly those of a whole-probe pass (row i from sample i alone).
:attr:`StreamedProbe.output_layer` is the last layer read to run in the forward pass.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from itertools import chain
from types import TracebackType
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from ddsmon.probe import LayerCapture, PassMode, ProbePass, RetryPass, slice_batch

__all__ = (
    "DEFAULT_FACTOR_BUDGET",
    "DEFAULT_MEMORY_BUDGET",
    "FOLD_BYTES",
    "LayerStream",
    "LayerStreams",
    "RowFactor",
    "StreamedProbe",
    "all_finite",
    "default_fold_rows",
    "factor_bytes",
    "micro_batch_sizes",
    "release_freed_memory",
)

log = logging.getLogger(__name__)

#: Bytes of one micro-batch's graph (``memory_budget`` of compute_signatures): 1 GiB.
DEFAULT_MEMORY_BUDGET = 1 << 30
#: Bytes of A and Delta rows one pass keeps for the parameter-side Gram: 4 GiB.
DEFAULT_FACTOR_BUDGET = 4 << 30
#: A :class:`RowFactor` folds its buffer once it holds ``4 d`` rows or this many
#: bytes, whichever is fewer (but never fewer than d rows).
FOLD_BYTES = 64 << 20


def release_freed_memory() -> bool:
    """Hand the heap's free pages back to the system (glibc's ``malloc_trim(0)``), after
    each micro-batch of a streamed pass; False where there is no glibc (a no-op).

    Why: a micro-batch's graph is hundreds of MiB of tensors freed at its end, while the
    row blocks each layer keeps (1 MiB a layer and a micro-batch on GPT-2-medium) are
    allocated between them and stay. glibc serves such blocks from its heap (its mmap
    threshold rises to 32 MiB once a large block is freed), so the kept blocks pin the
    heap's span and the freed graph memory between them stays resident: peak RSS grew
    with every micro-batch. ``malloc_trim`` releases the free pages inside the heap as
    well as at its top (``madvise``). Measured on a GPT-2-medium-shaped model cut to 8
    blocks, 32 x 128 tokens, one sample a micro-batch: peak RSS 4,046 MiB without it,
    3,199 MiB with it (3,117 MiB with glibc's mmap threshold pinned at 128 KiB instead,
    ``MALLOC_MMAP_THRESHOLD_``), against 2,707 MiB for the bare float64 floor; what is left
    above the floor is the rows the layers keep (about 64 MiB a layer here). A call
    takes a few ms (5 ms with 64 MiB free), against seconds for a micro-batch; not
    called for a pass on CUDA, whose graphs are not on the C heap."""
    trim = _malloc_trim()
    return bool(trim is not None and trim(0) >= 0)


def _malloc_trim() -> Callable[[int], int] | None:
    if not _TRIM:
        found: Callable[[int], int] | None = None
        try:
            import ctypes

            libc = ctypes.CDLL(None)  # this process's own symbols: the C library's
            found = getattr(libc, "malloc_trim", None)
            if found is not None:
                found.argtypes, found.restype = [ctypes.c_size_t], ctypes.c_int
        except (OSError, AttributeError):
            found = None
        _TRIM.append(found)
    return _TRIM[0]


_TRIM: list[Callable[[int], int] | None] = []


def _on_host(model: nn.Module) -> bool:
    """Whether the pass runs on the CPU (its graphs on the C heap), from the model's
    first parameter or buffer (a model with neither: yes)."""
    first = next(chain(model.parameters(), model.buffers()), None)
    return first is None or first.device.type == "cpu"


def _own(t: Tensor) -> Tensor:
    """``t`` itself when it owns its storage, else a compact copy: a kept row block must
    not keep alive the larger tensor it is a view of."""
    if t.is_contiguous() and t.untyped_storage().nbytes() == t.numel() * t.element_size():
        return t
    return t.clone(memory_format=torch.contiguous_format)


def all_finite(t: Tensor) -> bool:
    """Whether every entry of ``t`` is finite. Its sum first, one pass with no N x d
    temporaries: a NaN or an infinity anywhere makes the sum NaN or infinite, so a
    finite sum proves every entry finite; only where the sum is not finite (finite
    entries can overflow it) is each entry checked. On the ``bench_llc`` shape the
    entrywise check of every block took about 2 ms of a 60 ms reading."""
    if t.is_floating_point() and math.isfinite(float(t.sum())):
        return True
    return bool(torch.isfinite(t).all())


def _cat(parts: list[Tensor]) -> Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def default_fold_rows(width: int) -> int:
    """The rows a :class:`RowFactor` of this width buffers before it folds: ``4 d`` or
    :data:`FOLD_BYTES` of rows, whichever is fewer, but never fewer than d."""
    return max(width, min(4 * width, FOLD_BYTES // (8 * max(1, width))))


def factor_bytes(rows: int, width: int, block: int) -> int:
    """Bytes a :class:`RowFactor` of width d holds at most, for ``rows`` rows in all (N)
    added ``block`` rows at a time (float64): ``8 d min(N, max(fold_rows, d + block))``
    (its buffer never passes ``fold_rows`` unless it holds fewer than d rows, and right
    after a fold it holds R, d x d, and a block). The QR's own copy during a fold, and
    the factor's concatenation when it is read, come and go."""
    return 8 * width * min(rows, max(default_fold_rows(width), width + block))


class RowFactor:
    """M with ``M^T M = Z^T Z`` for the rows of Z (N x ``width``) added block by block.

    See the module docstring: M is Z itself until more than ``width`` rows arrived,
    then ``[R; buffer]`` with R the d x d factor of the folded rows. float64.
    """

    def __init__(self, width: int, *, fold_rows: int | None = None) -> None:
        self.width = width
        self.rows = 0  # rows added in all
        self.fold_rows = default_fold_rows(width) if fold_rows is None else max(width, fold_rows)
        self.folds = 0
        self._parts: list[Tensor] = []  # [R (if folded), buffered blocks...]
        self._held = 0  # rows in _parts

    def add(self, block: Tensor) -> None:
        """Add rows (k x width); a fold runs first when the held rows are at least
        ``width`` and would pass ``fold_rows``."""
        block = _own(block.to(torch.float64))
        if self._held >= self.width and self._held + block.shape[0] > self.fold_rows:
            r = torch.linalg.qr(_cat(self._parts), mode="r").R
            self._parts, self._held = [r], r.shape[0]
            self.folds += 1
        self._parts.append(block)
        self._held += block.shape[0]
        self.rows += block.shape[0]

    def matrix(self) -> Tensor:
        """M (at most ``width + fold_rows`` rows; Z itself when nothing was folded)."""
        if not self._parts:
            return torch.zeros(0, self.width, dtype=torch.float64)
        return _cat(self._parts)


class LayerStream:
    """What the streamed probe keeps of one layer (see the module docstring).

    ``x``: keep X's factor; ``g``: Delta's (its rows themselves where ``factors``).
    ``factors``: keep every row of A and Delta (for K from structure). Finiteness of X and Delta is
    checked on every block; once a block is not finite nothing more is kept.
    """

    def __init__(self, cap: LayerCapture, *, x: bool, g: bool, factors: bool) -> None:
        self.name = cap.name
        self.module = cap.module
        self.width = cap.width
        self.rows = 0
        self.bad_x = False
        self.bad_g = False
        self.factors = factors
        self.x = RowFactor(self.width) if x else None
        self.delta = RowFactor(self.width) if g and not factors else None
        self._inputs: list[Tensor] = []
        self._grads: list[Tensor] = []

    @property
    def nonfinite(self) -> str | None:
        """ "activations", "gradients", both, or None."""
        bad = [w for w, b in (("activations", self.bad_x), ("gradients", self.bad_g)) if b]
        return " and ".join(bad) + " not finite" if bad else None

    def add(self, cap: LayerCapture) -> None:
        self.rows += cap.rows
        self.bad_x = self.bad_x or not all_finite(cap.output)
        if cap.grad is not None:
            self.bad_g = self.bad_g or not all_finite(cap.grad)
        if self.bad_x or self.bad_g:
            self.x = self.delta = None
            self._inputs, self._grads = [], []
            return
        if self.x is not None:
            self.x.add(cap.output)
        if self.delta is not None and cap.grad is not None:
            self.delta.add(cap.grad)
        if self.factors and cap.inputs is not None and cap.grad is not None:
            self._inputs.append(_own(cap.inputs))
            self._grads.append(_own(cap.grad))

    def x_matrix(self) -> Tensor:
        """M with ``M^T M = X^T X`` (X itself for at most d rows), float64."""
        assert self.x is not None
        return self.x.matrix()

    def delta_matrix(self) -> Tensor:
        """Delta itself (when its rows are kept for K) or its running factor, float64."""
        if self.factors:
            return _cat(self._grads).to(torch.float64)
        assert self.delta is not None
        return self.delta.matrix()

    def factor_capture(self) -> LayerCapture | None:
        """A capture with every row of A and Delta (X not kept: an N x 0 placeholder)
        for :func:`ddsmon.param_gram.param_gram_structured`; None without them."""
        if not self._grads:
            return None
        grad = _cat(self._grads)
        return LayerCapture(
            self.name, self.module, grad.new_empty(grad.shape[0], 0), grad, _cat(self._inputs)
        )


class BatchSink(Protocol):
    """What :meth:`StreamedProbe.run` hands each micro-batch's captures to."""

    def add(self, caps: dict[str, LayerCapture], size: int) -> None: ...
    def drop(self, name: str) -> None: ...
    def reset(self) -> None: ...


class LayerStreams:
    """The :class:`LayerStream` of every layer one streamed pass keeps (a BatchSink).

    ``x``, ``g``: keep X's and Delta's factors (the activation side). ``factors(module)``:
    whether the module's K is built from structure (its A and Delta rows kept).

    **A budget on what the layers hold.** A layer's stream holds, through the pass, X's
    R factor and Delta's (:func:`factor_bytes`: up to ``min(N, max(fold_rows, d +
    block))`` rows of d each, float64) or, for K from structure, all N rows of A and
    Delta (in the forward dtype). Summed over every layer read at once that is what
    bounds a reading's memory once the graph is streamed: on GPT-2 small's 73 default
    layers, 11 GB. So which layers this pass keeps is decided at the first micro-batch,
    from each layer's bytes projected to the whole probe (``n / size`` times the
    micro-batch's rows): the layers in model order up to the first that would pass
    ``budget`` (None: no limit; the first layer is always kept, a layer over the budget
    alone in its pass). The rest are :attr:`deferred` whole, and read by further passes
    in the groups of :meth:`deferred_groups`, each a full forward/backward of the probe
    (exact: the same rows again), each group's decompositions read and freed before the
    next pass.
    """

    def __init__(
        self,
        n: int,
        *,
        x: bool,
        g: bool,
        factors: Callable[[nn.Module], bool],
        budget: int | None,
    ) -> None:
        self.n = n
        self.x = x
        self.g = g
        self.budget = budget
        self._factors = factors
        self.layers: dict[str, LayerStream] = {}
        self.deferred: list[str] = []
        #: each layer's projected bytes (see the class docstring), kept or deferred
        self.layer_bytes: dict[str, int] = {}
        self._keep: dict[int, bool] | None = None  # by id(module), once decided

    def keeps_inputs(self, module: nn.Module) -> bool:
        """The probe pass's ``keep_inputs``: A of the layers whose rows this pass keeps."""
        if self._keep is None:
            return self._factors(module)
        return self._keep.get(id(module), False)

    def add(self, caps: dict[str, LayerCapture], size: int) -> None:
        if self._keep is None:
            self._start(caps, size)
        for name, cap in caps.items():
            stream = self.layers.get(name)
            if stream is not None:  # else deferred to a later pass
                stream.add(cap)

    def _bytes(self, cap: LayerCapture, size: int, rows_kept: bool) -> int:
        """A layer's bytes through the pass, projected from this micro-batch's."""
        rows = cap.rows * self.n // size
        need = factor_bytes(rows, cap.width, cap.rows) if self.x else 0
        if rows_kept:
            assert cap.inputs is not None and cap.grad is not None
            block = cap.inputs.numel() * cap.inputs.element_size()
            block += cap.grad.numel() * cap.grad.element_size()
            need += block * self.n // size
        elif self.g and cap.grad is not None:
            need += factor_bytes(rows, cap.width, cap.rows)
        return need

    def _start(self, caps: dict[str, LayerCapture], size: int) -> None:
        left = self.budget
        self._keep = {}
        for name, cap in caps.items():
            rows_kept = (
                self._factors(cap.module) and cap.inputs is not None and cap.grad is not None
            )
            need = self._bytes(cap, size, rows_kept)
            self.layer_bytes[name] = need
            if not self.deferred and (left is None or need <= left or not self.layers):
                left = None if left is None else left - need
                self._keep[id(cap.module)] = rows_kept
                self.layers[name] = LayerStream(cap, x=self.x, g=self.g, factors=rows_kept)
            else:
                self._keep[id(cap.module)] = False
                self.deferred.append(name)
        if self.deferred:
            log.info(
                "the state of %d layer(s) would exceed factor_budget=%s bytes in one pass: "
                "read in %d further pass(es)",
                len(self.deferred),
                self.budget,
                len(self.deferred_groups()),
            )

    def drop(self, name: str) -> None:
        self.layers.pop(name, None)
        if name in self.deferred:
            self.deferred.remove(name)

    def reset(self) -> None:
        self.layers.clear()
        self.deferred.clear()
        self.layer_bytes.clear()
        self._keep = None

    def deferred_groups(self) -> list[list[str]]:
        """The deferred layers in passes of at most ``budget`` bytes each, in model
        order (a layer over the budget alone in its pass)."""
        groups: list[list[str]] = []
        current: list[str] = []
        used = 0
        for name in self.deferred:
            need = self.layer_bytes[name]
            if current and self.budget is not None and used + need > self.budget:
                groups.append(current)
                current, used = [], 0
            current.append(name)
            used += need
        if current:
            groups.append(current)
        return groups


def micro_batch_sizes(n: int, batch: int) -> list[int]:
    """Sizes of the micro-batches of n samples, ``batch`` each: ``[n]`` when it fits;
    else the first has at least 2 samples (see the module docstring)."""
    if batch >= n:
        return [n]
    first = min(n, max(2, batch))
    rest = n - first
    return [first] + [batch] * (rest // batch) + ([rest % batch] if rest % batch else [])


class _GraphMeter:
    """Bytes a forward pass's graph saves (each storage once, parameters and buffers
    excepted) and the largest output of any module, while active; :attr:`bytes` is the
    first plus three times the second."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.exclude = {
            t.untyped_storage().data_ptr() for t in chain(model.parameters(), model.buffers())
        }
        self.saved: dict[int, int] = {}
        self.largest_output = 0
        self._handles: list[Any] = []
        self._hooks: torch.autograd.graph.saved_tensors_hooks | None = None

    @property
    def bytes(self) -> int:
        return sum(self.saved.values()) + 3 * self.largest_output

    def _pack(self, t: Tensor) -> Tensor:
        """Count ``t``'s storage; keep a detached alias. (Keeping ``t`` itself would tie
        a saved output to its own grad_fn, a cycle through C++ that Python's garbage
        collector cannot see: the graph, the model copy and this meter would leak.)"""
        try:
            storage = t.untyped_storage()
            ptr, size = storage.data_ptr(), storage.nbytes()
        except (RuntimeError, NotImplementedError):  # sparse, nested: not counted
            return t.detach()
        if ptr not in self.exclude:
            self.saved[ptr] = max(self.saved.get(ptr, 0), size)
        return t.detach()

    def _on_output(self, _module: nn.Module, _args: Any, out: Any) -> None:
        t = out[0] if isinstance(out, (tuple, list)) and out else out
        if isinstance(t, Tensor):
            self.largest_output = max(self.largest_output, t.numel() * t.element_size())

    def __enter__(self) -> _GraphMeter:
        self._handles = [m.register_forward_hook(self._on_output) for m in self.model.modules()]
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, _unpack)
        self._hooks.__enter__()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._hooks is not None:
            self._hooks.__exit__(exc_type, exc, tb)
        for handle in self._handles:
            handle.remove()
        self._hooks, self._handles = None, []  # no cycle left through the bound hooks


def _unpack(t: Tensor) -> Tensor:
    return t


class StreamedProbe:
    """Probe passes over micro-batches of samples (see the module docstring).

    ``backward`` False: forward passes only (no loss, no graph). ``probe_batch``:
    samples per micro-batch, or None to size them from ``memory_budget`` (bytes) on
    the first :meth:`run`; later runs (the further passes of deferred layers) use
    the same sizes and the mode (:class:`~ddsmon.probe.PassMode`) the first learnt.
    """

    def __init__(
        self,
        model: nn.Module,
        inputs: Any,
        targets: Any,
        loss_fn: Callable[[Tensor, Tensor], Tensor],
        *,
        n: int,
        max_rows: int | None,
        backward: bool,
        probe_batch: int | None,
        memory_budget: int,
        max_width: int | None = None,
    ) -> None:
        self.model = model
        self.inputs = inputs
        self.targets = targets
        self.loss_fn = loss_fn
        self.n = n
        self.max_rows = max_rows
        self.max_width = max_width
        self.backward = backward
        self.batch = probe_batch
        self.memory_budget = memory_budget
        self.mode = PassMode()
        self.sample_bytes: int | None = None  # measured graph bytes of one sample
        self.passes = 0  # passes started, a retried one counted again
        self.runs = 0  # runs completed
        self.micro_batches = 0
        #: the per-sample losses (n,) of the last completed backward run, sample order
        self.losses: Tensor | None = None
        #: the last layer read to run in the forward pass (of the first completed run,
        #: which read every layer; later runs read groups of them)
        self.output_layer: str | None = None

    def sizes(self, names: list[str] | None) -> list[int]:
        """The micro-batch sizes (measuring one sample's graph the first time)."""
        if self.batch is None:
            self.batch = self._measure(names)
        return micro_batch_sizes(self.n, self.batch)

    def _measure(self, names: list[str] | None) -> int:
        if self.n == 1:
            return 1
        one = slice(0, 1)
        while True:
            meter = _GraphMeter(self.model)
            probe = ProbePass(
                names, 1, lambda _m: False, None, self.mode, total=self.n, strict=False,
                backward=self.backward, graph_only=True, max_width=self.max_width,
            )  # fmt: skip
            try:
                with meter:
                    probe.run(
                        self.model,
                        slice_batch(self.inputs, one),
                        slice_batch(self.targets, one),
                        self.loss_fn,
                    )
            except RetryPass as retry:
                retry.__traceback__ = None  # its frames hold the model: free it now
                self.mode = retry.apply(self.mode)
                continue
            except Exception as exc:  # the whole-probe pass will say what is wrong
                log.debug("one-sample graph measurement failed (%s): one pass", exc)
                return self.n
            break
        self.sample_bytes = meter.bytes
        batch = self.memory_budget // max(1, meter.bytes)
        return int(max(1, min(self.n, batch)))

    def run(
        self,
        names: list[str] | None,
        sink: BatchSink,
        *,
        keep_inputs: Callable[[nn.Module], bool],
        strict: bool,
    ) -> list[str]:
        """Every micro-batch through a probe pass, its captures to ``sink``; returns the
        layers read, in order (a default-selected layer that a later micro-batch cannot
        read is dropped from them and from the sink)."""
        while True:
            try:
                return self._run(names, sink, keep_inputs, strict)
            except RetryPass as retry:
                retry.__traceback__ = None
                self.mode = retry.apply(self.mode)
                sink.reset()

    def _run(
        self,
        names: list[str] | None,
        sink: BatchSink,
        keep_inputs: Callable[[nn.Module], bool],
        strict: bool,
    ) -> list[str]:
        chosen: list[str] | None = None
        forward_order: list[str] = []
        losses: list[Tensor] = []
        start = 0
        self.passes += 1
        for size in self.sizes(names):
            part = slice(start, start + size)
            start += size
            probe = ProbePass(
                names if chosen is None else chosen, size, keep_inputs, self.max_rows,
                self.mode, total=self.n, strict=strict, backward=self.backward,
                stop_early=chosen is not None, max_width=self.max_width,
            )  # fmt: skip
            caps = probe.run(
                self.model,
                slice_batch(self.inputs, part),
                slice_batch(self.targets, part),
                self.loss_fn,
            )
            self.micro_batches += 1
            if probe.losses is not None:
                losses.append(probe.losses)
            if chosen is None:
                chosen = list(caps)
                forward_order = list(probe.forward_order)
            else:
                for name in [c for c in chosen if c not in caps]:
                    log.debug("layer %r is not per-sample in every micro-batch: left out", name)
                    chosen.remove(name)
                    sink.drop(name)
            sink.add(caps, size)
            del caps, probe
            if size < self.n and _on_host(self.model):
                release_freed_memory()
        if not self.runs:  # later runs read groups of the first run's layers
            kept = [name for name in forward_order if name in set(chosen or [])]
            self.output_layer = kept[-1] if kept else None
        self.runs += 1
        if losses and sum(t.shape[0] for t in losses) == self.n:
            self.losses = _cat(losses)
        return chosen or []
