"""Benchmark harness shared by all op families.

Vocabulary:

- A *suite* (one module ``benchmarks/bench_<family>.py`` defining ``SUITE``) holds the ops of
  one family, the shape grid of each profile (``cpu``, ``quick``, ``full``; ``cpu-quick`` is
  the first value of every key of the ``cpu`` grid), the modes it can time, its default
  modes, and a summary.
- An *op* (:class:`OpSpec`) has providers, a FLOP model and a byte model.
- A *provider* (:class:`Provider`) builds the inputs of one shape and the function to time
  (:class:`Prepared`); it may be unavailable on this machine (a reason is recorded) or refuse
  a shape (:class:`Skip`).
- A *case* (:class:`Case`) is (op, provider, mode, shape, dtype), mode in fwd, bwd, fwd+bwd.

Per op, shape and provider the inputs are built once, then each mode is warmed up (compile
and autotuning excluded from the timings) and timed (:mod:`benchmarks.timing`). ``fwd`` is
one forward call with grad enabled (as in training), ``fwd+bwd`` a forward and ``.backward()``
with the gradients reset between calls, and ``bwd`` is derived by subtraction,
p50(fwd+bwd) - p50(fwd): one method serves every provider and none has to support
``backward(retain_graph=True)`` (torch.compile refuses it when it donates buffers to the
backward graph). Out-of-memory is caught and recorded as status ``oom``; other errors as
``error``; the sweep always goes on. Records are appended to the CSV as each case ends, so a
run cut short keeps what it measured.
"""

from __future__ import annotations

import gc
import itertools
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from .ceilings import Ceilings, measure
from .env import GpuMonitor
from .timing import Timing, call_ms, peak_memory_mib, time_fn

MODES = ("fwd", "bwd", "fwd+bwd")
TIMED_MODES = ("fwd", "fwd+bwd")
CPU_QUICK = "cpu-quick"
PROFILES = ("cpu", CPU_QUICK, "quick", "full")

AGREEMENT = {torch.float64: 1e-9, torch.float32: 1e-3, torch.float16: 5e-2,
             torch.bfloat16: 5e-2}  # fmt: skip
"""The largest relative difference between a provider's loss and the reference's: every
provider computes the same function of the same inputs, so a larger one is a wrong result,
not rounding (16-bit: the providers round differently along the way)."""

UNITS = {
    "ms": "ms",
    "peak_mem_mb": "MiB above inputs (grads, saved tensors, temporaries)",
    "tflops": "TFLOP/s (op FLOP model)",
    "gbps": "GB/s (op byte model)",
    "pct_matmul_ceiling": "% of measured matmul TFLOP/s",
    "pct_copy_ceiling": "% of measured copy GB/s",
    "loss": "value",
    "loss_diff": "|loss - reference loss| / max(|reference loss|, 1) (an error above AGREEMENT)",
    "grad_checksum": "sum over the gradient leaves of <grad, R>, R fixed N(0, 1) per leaf",
    "grad_norm": "the gradients' 2-norm over every leaf",
    "grad_diff": "|grad checksum - the reference's| / the reference's grad norm (an error "
    "above AGREEMENT)",
    "speedup": "x (other ms / reference ms, p50)",
    "mem_ratio": "x (reference MiB / other MiB)",
    "host_us": "us per call (host; Triton's launcher stubbed)",
    "saved_mb": "MiB autograd keeps for backward after the forward (inputs, parameters excluded)",
}


class Skip(Exception):
    """Raised by a provider's ``build`` to skip a shape, with the reason as message."""


class FixedGrads(torch.autograd.Function):
    """``FixedGrads.apply(exact, out_1, G_1, out_2, G_2, ...)``: the loss L = sum_i <out_i,
    G_i> of an op's outputs with fixed incoming gradients G_i (None: no gradient, zeros
    for a floating output). Backward returns the G_i as they are (no work); forward computes
    L (in fp64) only when ``exact``, else returns an uninitialised 0-d tensor (no kernel),
    so the timed calls pay for the op alone. :func:`checksummed` makes the first call exact:
    the ``loss`` row on which every provider must agree."""

    @staticmethod
    def forward(ctx, exact, *pairs):
        outs, grads = pairs[0::2], pairs[1::2]
        ctx.grads = grads
        ctx.like = [(o.shape, o.dtype, o.device) for o in outs]
        if not exact:
            return outs[0].new_empty((), dtype=torch.float32)
        total = sum((o.double() * g.double()).sum() for o, g in zip(outs, grads, strict=True)
                    if g is not None)  # fmt: skip
        return torch.as_tensor(total, dtype=torch.float64).float()

    @staticmethod
    def backward(ctx, _):
        out = [None]
        for g, (shape, dtype, device) in zip(ctx.grads, ctx.like, strict=True):
            if g is None and dtype.is_floating_point:
                g = torch.zeros(shape, dtype=dtype, device=device)
            out += [g, None]
        return tuple(out)


def checksummed(call: Callable, grads: Callable) -> Callable[[], torch.Tensor]:
    """A provider's ``fn``: ``call()`` (the op: a tensor or a tuple of them) through
    :class:`FixedGrads` with the incoming gradients ``grads(outputs)`` (one per output, or
    None); its first call returns the exact checksum, the later ones a placeholder."""
    calls = [0]

    def fn():
        out = call()
        outs = out if isinstance(out, tuple) else (out,)
        calls[0] += 1
        pairs = [t for o, g in zip(outs, grads(outs), strict=True) for t in (o, g)]
        return FixedGrads.apply(calls[0] == 1, *pairs)

    return fn


@dataclass(frozen=True)
class Prepared:
    """What a provider built for one shape.

    fn: the forward pass on the prepared inputs, returning the scalar loss.
    leaves: the tensors whose ``.grad`` the backward pass fills (reset between calls).
    note: provider details recorded with every row (backend, compile options, ...).
    call: the op call alone, for the host-time mode (:mod:`benchmarks.host`): ``fn``
        without what the suite wraps around it (the rotary suite's checksum); None: ``fn``.
    metrics: measured once per case beside the timings, {metric: value} recorded on the
        fwd+bwd case when a backward mode is asked (``saved_mb``); None: none.
    grads_as_reference: the leaves' gradients (a list, None where none) in the other
        providers' parametrisation, for the gradient agreement (siglip-kernel's log-scale
        leaf: d/ds = d/dlog_t / s); None: as they are.
    """

    fn: Callable[[], torch.Tensor]
    leaves: tuple[torch.Tensor, ...]
    note: str = ""
    call: Callable[[], object] | None = None
    metrics: Callable[[], Mapping[str, float]] | None = None
    grads_as_reference: Callable[[list], list] | None = None


@dataclass(frozen=True)
class BuildArgs:
    op: str
    shape: Mapping[str, int]
    dtype: torch.dtype
    device: torch.device
    seed: int
    options: Mapping[str, str]


@dataclass(frozen=True)
class Provider:
    """name; build(args) -> Prepared; available(device) -> None or the reason it is not;
    limit(shape) -> None or the reason a shape is skipped unless limits are off;
    agrees_with: the provider computing the same function, whose loss this one's must
    match (None: the suite's reference; a variant of the op, such as a gated attention,
    names another provider of that variant); dtype: the one it computes in whatever the
    run's (the Q-Former's fp32 modules), which its rows carry and its byte model and
    matmul ceiling take (None: the run's)."""

    name: str
    build: Callable[[BuildArgs], Prepared]
    available: Callable[[torch.device], str | None] = lambda device: None
    limit: Callable[[Mapping[str, int]], str | None] = lambda shape: None
    agrees_with: str | None = None
    dtype: torch.dtype | None = None


@dataclass(frozen=True)
class OpSpec:
    """flops(shape, mode) and nbytes(shape, mode, itemsize): the op's cost models;
    ``launches_triton``: whether vlmkernels runs it with its family's Triton kernels (the
    kernels ``profile`` names for Nsight Compute)."""

    name: str
    providers: tuple[Provider, ...]
    flops: Callable[[Mapping[str, int], str], float]
    nbytes: Callable[[Mapping[str, int], str, int], float]
    launches_triton: bool = True


@dataclass(frozen=True)
class RunConfig:
    device: torch.device
    dtype: torch.dtype
    profile: str
    modes: tuple[str, ...]
    providers: frozenset[str] | None = None
    shape_overrides: Mapping[str, Sequence[int]] = field(default_factory=dict)
    limits: bool = True
    time_budget_s: float | None = None
    options: Mapping[str, str] = field(default_factory=dict)
    seed: int = 0
    started: float = field(default_factory=time.perf_counter)

    def over_budget(self) -> bool:
        return (
            self.time_budget_s is not None
            and time.perf_counter() - self.started > self.time_budget_s
        )


@dataclass(frozen=True)
class Suite:
    """One op family. grid(profile) gives the values of each shape key (a cartesian sweep)
    of the profiles ``cpu``, ``quick`` and ``full``; ``modes`` are the modes the suite can
    time (a forward-only op has no backward), ``default_modes`` those it times unless asked;
    summarize(results, config) returns the lines printed after the tables; ``host_shape`` is
    the small shape of the host-time mode (:mod:`benchmarks.host`), None for a suite whose
    ops have no host-time budget."""

    name: str
    ops: tuple[OpSpec, ...]
    grid: Callable[[str], dict[str, list[int]]]
    x_name: str
    reference: str = "vlmkernels"
    default_modes: tuple[str, ...] = ("fwd", "fwd+bwd")
    summarize: Callable[[Results, RunConfig], list[str]] | None = None
    modes: tuple[str, ...] = MODES
    host_shape: Mapping[str, int] | None = None

    def __post_init__(self):
        if not set(self.default_modes) <= set(self.modes) <= set(MODES):
            raise ValueError(
                f"suite {self.name}: default_modes {self.default_modes} must be among its "
                f"modes {self.modes}, and those among {MODES}"
            )

    def default_dtype(self, device: torch.device) -> torch.dtype:
        return torch.bfloat16 if device.type == "cuda" else torch.float32

    def sweep(self, profile: str) -> dict[str, list[int]]:
        """{shape key: values} of ``profile``; ``cpu-quick``: the first value of each key
        of the ``cpu`` grid (one shape, the smallest CPU sweep)."""
        if profile == CPU_QUICK:
            return {k: list(v[:1]) for k, v in self.grid("cpu").items()}
        return dict(self.grid(profile))

    def shapes(self, profile: str, overrides: Mapping[str, Sequence[int]]) -> list[dict]:
        grid = self.sweep(profile)
        for key, values in overrides.items():
            if key not in grid:
                raise KeyError(f"suite {self.name} has no shape key {key!r} (keys: {list(grid)})")
            grid[key] = list(values)
        keys = list(grid)
        return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*grid.values())]


@dataclass(frozen=True)
class Case:
    op: str
    provider: str
    mode: str
    shape: tuple[tuple[str, int], ...]
    dtype: str

    @property
    def shape_str(self) -> str:
        return shape_str(dict(self.shape))


@dataclass
class Record:
    """One measured (or failed) metric of one case: a CSV row without the run columns."""

    case: Case
    metric: str
    p50: float | None = None
    p20: float | None = None
    p80: float | None = None
    status: str = "ok"
    note: str = ""
    unit: str = ""
    before: dict = field(default_factory=dict)
    after: dict = field(default_factory=dict)
    throttled: str = ""

    def __post_init__(self):
        if not self.unit:
            self.unit = UNITS.get(self.metric.split("_vs_")[0], "")

    @property
    def ok(self) -> bool:
        return self.status == "ok" and self.p50 is not None


def shape_str(shape: Mapping[str, int]) -> str:
    return ",".join(f"{k}={v}" for k, v in shape.items())


def dtype_str(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass
class Lookup:
    value: float | None
    reason: str = ""
    record: Record | None = None


class Results:
    """All records of a run, with lookups that explain why a value is missing."""

    def __init__(self):
        self.records: list[Record] = []
        self.unavailable: dict[tuple[str, str], str] = {}

    def add(self, records: Iterable[Record]) -> None:
        self.records.extend(records)

    def find(self, case: Case, metric: str) -> Record | None:
        for r in reversed(self.records):
            if r.case == case and r.metric == metric:
                return r
        return None

    def get(self, case: Case, metric: str) -> Lookup:
        key = (case.op, case.provider)
        if key in self.unavailable:
            return Lookup(None, f"provider {case.provider} unavailable: {self.unavailable[key]}")
        rec = self.find(case, metric) or self.find(case, "ms")
        if rec is None:
            return Lookup(
                None,
                f"{case.op} {case.provider} {case.mode} {case.shape_str} {case.dtype} "
                "not in this run's sweep",
            )
        if rec.metric == metric and rec.ok:
            return Lookup(rec.p50, "", rec)
        if rec.status == "ok":
            return Lookup(None, f"{metric} of {case.provider} not recorded", rec)
        detail = f": {rec.note}" if rec.note else ""
        return Lookup(None, f"{case.provider} {rec.status}{detail}", rec)


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message, at most 300 characters (a table cell, a
    one-line error)."""
    return str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""


def _failure(exc: BaseException) -> tuple[str, str]:
    """(status, note) for an exception raised while building or running a case."""
    if isinstance(exc, Skip):
        return "skipped", str(exc)
    text = first_line(exc)
    if isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower():
        return "oom", text
    return "error", f"{type(exc).__name__}: {text}"


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _mode_call(prepared: Prepared, mode: str):
    """(callable, tensors whose grads to reset) for a timed mode."""
    if mode == "fwd":
        return prepared.fn, ()

    def step():
        prepared.fn().backward()

    return step, prepared.leaves


def _timer_note(device: torch.device, timing: Timing) -> str:
    if device.type == "cuda":
        return "do_bench q50/20/80"
    return f"perf_counter x{timing.reps}"


def _throughput(
    op: OpSpec, case: Case, shape: Mapping[str, int], timing: Timing, itemsize: int, ceil
) -> list[Record]:
    """TFLOP/s, GB/s and % of ceilings from the time quantiles (a slower time quantile is
    a lower throughput quantile, hence p20 of a rate comes from p80 of the time)."""
    flops = op.flops(shape, case.mode)
    nbytes = op.nbytes(shape, case.mode, itemsize)

    def rate(amount: float, scale: float, ceiling: float | None):
        vals = [amount / (t * 1e-3) / scale for t in (timing.p50, timing.p80, timing.p20)]
        if ceiling is not None:
            vals = [100.0 * v / ceiling for v in vals]
        return dict(zip(("p50", "p20", "p80"), vals, strict=True))

    return [
        Record(case, "tflops", **rate(flops, 1e12, None)),
        Record(case, "gbps", **rate(nbytes, 1e9, None)),
        Record(case, "pct_matmul_ceiling", **rate(flops, 1e12, ceil.matmul_tflops)),
        Record(case, "pct_copy_ceiling", **rate(nbytes, 1e9, ceil.copy_gbps)),
    ]


def _difference(got: float, want: float, scale: float) -> float:
    """|got - want| / scale; 0 where both are NaN (the same non-result)."""
    if math.isnan(got) and math.isnan(want):
        return 0.0
    return abs(got - want) / scale


def _verdict(op: OpSpec, shape, case: Case, metric: str, diff: float, tol: float, note: str):
    """The agreement record: ok within ``tol``, else an error (printed) with ``note``."""
    if diff <= tol:
        return Record(case, metric, diff)
    print(f"  [{op.name}] {shape_str(shape)} DISAGREE: {note}")
    return Record(case, metric, diff, status="error", note=note)


def _failed(cases: Iterable[Case], status: str, note: str) -> list[Record]:
    return [Record(c, "ms", status=status, note=note) for c in cases]


class Runner:
    """Runs the cases of one suite and hands every finished group of records to ``sink``."""

    def __init__(
        self,
        suite: Suite,
        config: RunConfig,
        ceilings: Ceilings,
        monitor: GpuMonitor,
        sink: Callable[[list[Record]], None],
        ceilings_of: Callable[[torch.dtype], Ceilings] | None = None,
    ):
        """``ceilings``: the run dtype's; ``ceilings_of(dtype)``: those of a provider that
        computes in another dtype (:attr:`Provider.dtype`; default: measured here)."""
        self.suite, self.cfg, self.monitor = suite, config, monitor
        self.sink = sink
        self.results = Results()
        self._ceilings = {config.dtype: ceilings}
        self._ceilings_of = ceilings_of or (lambda dtype: measure(config.device, dtype))

    def _dtype(self, op: OpSpec, provider: str) -> torch.dtype:
        """The dtype ``provider`` of ``op`` computes in (:attr:`Provider.dtype`)."""
        own = next((p.dtype for p in op.providers if p.name == provider), None)
        return own or self.cfg.dtype

    def _ceilings_for(self, dtype: torch.dtype) -> Ceilings:
        if dtype not in self._ceilings:
            self._ceilings[dtype] = self._ceilings_of(dtype)
        return self._ceilings[dtype]

    def _emit(self, records: list[Record]) -> None:
        self.results.add(records)
        self.sink(records)

    def _case(self, op: OpSpec, provider: str, mode: str, shape: Mapping[str, int]) -> Case:
        dtype = dtype_str(self._dtype(op, provider))
        return Case(op.name, provider, mode, tuple(shape.items()), dtype)

    def providers(self, op: OpSpec) -> list[Provider]:
        chosen = self.cfg.providers
        return [p for p in op.providers if chosen is None or p.name in chosen]

    def run(self, ops: Sequence[OpSpec]) -> Results:
        shapes = self.suite.shapes(self.cfg.profile, self.cfg.shape_overrides)
        for op in ops:
            ready = []
            for p in self.providers(op):
                reason = p.available(self.cfg.device)
                if reason is None:
                    ready.append(p)
                    continue
                self.results.unavailable[(op.name, p.name)] = reason
                self._emit(
                    [
                        Record(
                            Case(op.name, p.name, "", (), ""),
                            "ms",
                            status="unavailable",
                            note=reason,
                        )
                    ]
                )
                print(f"  [{op.name}] provider {p.name} unavailable: {reason}")
            for shape in shapes:
                for p in ready:
                    self._emit(self._run_provider(op, p, shape))
                self._emit(self._comparisons(op, ready, shape))
        return self.results

    def _run_provider(self, op: OpSpec, provider: Provider, shape: dict) -> list[Record]:
        cfg = self.cfg
        dtype = provider.dtype or cfg.dtype
        timed = [m for m in TIMED_MODES if m in cfg.modes or "bwd" in cfg.modes]
        cases = {m: self._case(op, provider.name, m, shape) for m in MODES}
        wanted = [cases[m] for m in MODES if m in cfg.modes]
        label = f"  [{op.name}] {shape_str(shape)} {provider.name:<10}"
        if cfg.over_budget():
            return _failed(wanted, "skipped", f"time budget of {cfg.time_budget_s:g} s spent")
        reason = provider.limit(shape) if cfg.limits else None
        if reason:
            print(f"{label} skipped: {reason}")
            return _failed(wanted, "skipped", reason)

        records: list[Record] = []
        prepared = None
        status = note = ""
        try:
            prepared = provider.build(
                BuildArgs(op.name, shape, cfg.dtype, cfg.device, cfg.seed, cfg.options)
            )
            loss = prepared.fn()
            records.append(Record(cases["fwd"], "loss", p50=float(loss.detach().float())))
            backward = any("bwd" in m for m in cfg.modes)
            if backward:
                records += self._grad_checksum(cases["fwd+bwd"], prepared, loss)
            del loss
            if prepared.metrics is not None and backward:
                for name, value in prepared.metrics().items():
                    records.append(Record(cases["fwd+bwd"], name, value, note=prepared.note))
                    print(f"{label} {name:<8} {value:10.4g}")
        except Exception as exc:  # noqa: BLE001 - any failure becomes a recorded status
            status, note = _failure(exc)
        if status:
            prepared = None
            _free(cfg.device)
            print(f"{label} {status}: {note}")
            return _failed(wanted, status, note)

        timings: dict[str, Timing] = {}
        failures: dict[str, tuple[str, str]] = {}
        for mode in timed:
            case = cases[mode]
            status = note = ""
            try:
                fn, grads = _mode_call(prepared, mode)
                call_ms(fn, cfg.device)  # compile / autotune / first-touch
                estimate = call_ms(fn, cfg.device)
                before = self.monitor.sample()
                timing = time_fn(fn, cfg.device, grad_to_none=grads, estimate_ms=estimate)
                mem = peak_memory_mib(fn, cfg.device, prepared.leaves)
                after = self.monitor.sample()
                del fn
            except Exception as exc:  # noqa: BLE001
                status, note = _failure(exc)
            if status:
                _free(cfg.device)
                print(f"{label} {mode:<8} {status}: {note}")
                failures[mode] = (status, note)
                if mode in cfg.modes:
                    records.append(Record(case, "ms", status=status, note=note))
                continue
            timings[mode] = timing
            if mode not in cfg.modes:
                continue
            full_note = "; ".join(x for x in (prepared.note, _timer_note(cfg.device, timing)) if x)
            throttled = GpuMonitor.throttled(before, after)
            mode_records = [
                Record(case, "ms", timing.p50, timing.p20, timing.p80, note=full_note),
                Record(case, "peak_mem_mb", mem, note=full_note)
                if mem is not None
                else Record(
                    case,
                    "peak_mem_mb",
                    status="not_measured",
                    note="no allocator statistics on this device",
                ),
                *_throughput(op, case, shape, timing, dtype.itemsize, self._ceilings_for(dtype)),
            ]
            for r in mode_records:
                r.before, r.after, r.throttled = before, after, throttled
            records.extend(mode_records)
            mem_txt = f"{mem:9.1f} MiB" if mem is not None else ""
            flag = " THROTTLED" if throttled == "yes" else ""
            print(f"{label} {mode:<8} {timing.p50:10.3f} ms {mem_txt}{flag}")

        if "bwd" in cfg.modes:
            records.append(self._derived_bwd(cases["bwd"], timings, failures))
        prepared = None
        _free(cfg.device)
        return records

    @staticmethod
    def _derived_bwd(case: Case, timings: dict[str, Timing], failures: dict) -> Record:
        if failures:
            mode, (status, note) = next(iter(failures.items()))
            return Record(case, "ms", status=status, note=f"{mode} failed: {note}")
        fb, f = timings["fwd+bwd"].p50, timings["fwd"].p50
        if fb <= f:
            return Record(
                case,
                "ms",
                status="below_noise",
                note=f"p50(fwd+bwd)={fb:.4g} ms not above p50(fwd)={f:.4g} ms",
            )
        return Record(
            case,
            "ms",
            p50=fb - f,
            note="derived: p50(fwd+bwd) - p50(fwd); no throughput (some providers do "
            "backward work in the forward pass)",
        )

    def _grad_checksum(self, case: Case, prepared: Prepared, loss) -> list[Record]:
        """grad_checksum and grad_norm records of the first (exact) call's gradients: a
        projection of every leaf's gradient on fixed random weights (the same, leaf by
        leaf, for every provider with the same leaf shapes, which the note lists). None
        where the loss has no gradient; a backward that fails here fails in its timed
        mode too, where it is recorded."""
        leaves = prepared.leaves
        if not leaves or not loss.requires_grad:
            return []
        try:
            loss.backward()
        except Exception:  # noqa: BLE001 - recorded by the timed fwd+bwd
            return []
        grads = [t.grad for t in leaves]
        for t in leaves:
            t.grad = None
        if prepared.grads_as_reference is not None:
            grads = prepared.grads_as_reference(grads)
        gen = torch.Generator().manual_seed(self.cfg.seed + 1)
        total, squares, shapes = 0.0, 0.0, []
        for t, g in zip(leaves, grads, strict=True):
            weights = torch.randn(tuple(t.shape), generator=gen, dtype=torch.float64)
            shapes.append("x".join(map(str, t.shape)) if g is not None else "none")
            if g is not None:
                g = g.double()
                total += float((g * weights.to(g.device)).sum())
                squares += float(g.square().sum())
        note = f"leaves {','.join(shapes)}"
        return [
            Record(case, "grad_checksum", total, note=note),
            Record(case, "grad_norm", math.sqrt(squares), note=note),
        ]

    def _agreement(self, op: OpSpec, providers: list[Provider], shape: dict, ref: str):
        """loss_diff_vs_<p> records: |loss(p) - loss(q)| / max(|loss(q)|, 1), q the provider
        p agrees with (:attr:`Provider.agrees_with`, else ``ref``); an error above
        :data:`AGREEMENT`. A check for wrong results, not for numerics (the tests compare
        with float64): a checksum with random weights cancels, hence the floor of 1."""
        out = []
        tol = AGREEMENT.get(self.cfg.dtype, AGREEMENT[torch.bfloat16])
        for p in providers:
            base = p.agrees_with or ref
            base_fwd = self._case(op, base, "fwd", shape)
            want = self.results.find(base_fwd, "loss")
            got = self.results.find(self._case(op, p.name, "fwd", shape), "loss")
            if p.name == base or not (want and got and want.ok and got.ok):
                continue
            diff = _difference(got.p50, want.p50, max(abs(want.p50), 1.0))
            note = (f"{p.name}'s loss {got.p50:.8g} disagrees with {base}'s {want.p50:.8g} "
                    f"(relative difference {diff:.3g} > {tol:g})")  # fmt: skip
            out.append(_verdict(op, shape, base_fwd, f"loss_diff_vs_{p.name}", diff, tol, note))
        return out + self._grad_agreement(op, providers, shape, ref, tol)

    def _grad_agreement(self, op, providers, shape, ref, tol) -> list[Record]:
        """grad_diff_vs_<p> records: |checksum(p) - checksum(q)| / |grad(q)|, the gradients'
        relative difference seen through fixed random weights, for providers whose leaves
        have the same shapes (q as in :meth:`_agreement`); an error above ``tol``."""
        out = []
        for p in providers:
            base = p.agrees_with or ref
            base_case = self._case(op, base, "fwd+bwd", shape)
            want = self.results.find(base_case, "grad_checksum")
            norm = self.results.find(base_case, "grad_norm")
            got = self.results.find(self._case(op, p.name, "fwd+bwd", shape),
                                    "grad_checksum")  # fmt: skip
            if p.name == base or not (want and got and norm) or want.note != got.note:
                continue
            diff = _difference(got.p50, want.p50, max(norm.p50, 1e-30))
            note = (f"{p.name}'s gradients differ from {base}'s by {diff:.3g} of their norm "
                    f"(> {tol:g}; checksums {got.p50:.8g}, {want.p50:.8g})")  # fmt: skip
            out.append(_verdict(op, shape, base_case, f"grad_diff_vs_{p.name}", diff, tol, note))
        return out

    def _comparisons(self, op: OpSpec, providers: list[Provider], shape: dict) -> list[Record]:
        """speedup_vs_<p> = ms(p) / ms(reference); mem_ratio_vs_<p> = MiB(ref) / MiB(p);
        and the loss agreement (:meth:`_agreement`)."""
        ref = self.suite.reference
        out = self._agreement(op, providers, shape, ref)
        if ref not in {p.name for p in providers}:
            return out
        for mode in self.cfg.modes:
            ref_case = self._case(op, ref, mode, shape)
            for p in providers:
                if p.name == ref:
                    continue
                other = self._case(op, p.name, mode, shape)
                for metric, name, fn in (
                    ("ms", "speedup", lambda r, o: o / r),
                    ("peak_mem_mb", "mem_ratio", lambda r, o: r / o),
                ):
                    a, b = self.results.find(ref_case, metric), self.results.find(other, metric)
                    if a and b and a.ok and b.ok and a.p50 > 0 and b.p50 > 0:
                        value = fn(a.p50, b.p50)
                        if math.isfinite(value):
                            out.append(Record(ref_case, f"{name}_vs_{p.name}", value))
        return out
