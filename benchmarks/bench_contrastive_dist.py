r"""Contrastive losses across GPUs (issue 6): the ring mode's overhead, and ALBEF/BLIP targets.

Two groups of ops, measured in the same run.

**Ring overhead** (``clip_loss_dist``, ``siglip_loss_dist``). Inputs as in
:mod:`benchmarks.bench_contrastive` (same seed, same values): (N, d) L2-normalised image and
text features with ``requires_grad``, a learnable scale (and bias for SigLIP). Providers:

- ``vlmkernels``: :func:`vlmkernels.clip_loss` / :func:`vlmkernels.siglip_loss` without a
  process group (the fused single-device kernels).
- ``vlmkernels_ring``: the same call with ``process_group=`` a single-rank group: the ring
  code path (:mod:`vlmkernels.distributed.ring`) with no peer. A single-rank group
  communicates nothing (no metadata exchange, no point-to-point message, no all-reduce):
  the difference is the ring's fixed cost (the block primitives in place of the fused op,
  fp32 dX and dY accumulators, argument checks, Python), not the network. The group
  is NCCL on CUDA and gloo on the CPU. If no default group exists the suite creates one
  (``init_process_group`` with a ``FileStore`` in a temporary directory, rank 0, world size
  1) on first use and destroys it after the run (in the summary, and at exit as a fallback);
  an existing default group of world size 1 is used as it is, and a larger one makes the
  provider skip (run this suite in one process). If the ring module has not landed the
  provider is recorded as unavailable with that reason; any other import failure is an
  error.

FLOP and byte models: those of the contrastive suite (useful FLOPs of the dense
computation, recomputation not counted): forward 2 N^2 d, backward 4 N^2 d; bytes 2 N d e
forward, 4 N d e backward (e the element size).

**ALBEF / BLIP image-text contrastive targets** (``albef_itc``, ``albef_itc_distill``,
``blip_itc_ids``): one direction (image-to-text; ALBEF's loss is the mean of two such calls)
of the cross-entropy of b queries (online image features, ``requires_grad``) over b + Q keys
(the b momentum text features of the batch followed by a Q-entry queue; no gradient, as in
ALBEF and BLIP where both come from the momentum encoder), d = 256 (ALBEF's and BLIP's
``embed_dim``), learnable scale s = 1/0.07 (ALBEF's ``1 / temp``). The keys are one
prebuilt (b + Q, d) tensor for every provider (the concatenation with the queue is not
timed).

- ``albef_itc``: one-hot targets (query i's positive is key i), ALBEF without distillation.
- ``albef_itc_distill``: targets ``alpha softmax(s Q_m K^T) + (1 - alpha) one-hot`` with
  teacher (momentum image) queries Q_m, alpha = 0.4 (ALBEF's momentum distillation).
- ``blip_itc_ids``: BLIP's retrieval form: positives are the keys whose id equals the query's
  id (``idx`` and ``idx_queue``), spread evenly, and distillation with alpha = 0.4. Ids are
  drawn uniformly from [0, (b + Q) / 4): about 4 positives per row besides the in-batch one
  (a COCO-like 5 captions per image).

Providers: ``vlmkernels`` (:func:`vlmkernels.contrastive_cross_entropy`), ``eager`` (the
formula as ALBEF's code computes it, :func:`itc_eager`: the b x (b + Q) logits, a dense
target matrix, ``-sum(log_softmax(sim) * targets, 1).mean()``), ``compile``
(``torch.compile`` of the same function, compile time excluded).

FLOP model (M = b queries, K = b + Q keys; useful FLOPs, recomputation not counted): forward
2 M K d, plus 2 M K d for the teacher logits where there is a teacher; backward 2 M K d
(dQ = dS K; the keys need no gradient). Byte model: forward (M + K) d e (+ M d e for the
teacher queries), backward (2 M + K) d e (read Q and K, write dQ). At b = 256, Q = 65536,
d = 256 the forward is 8.6 GFLOP and 34 MB in bf16: microseconds on an H100, so launch
latency and the b x (b + Q) intermediates (not the products) decide these times.

Shapes (the harness's grid is one cartesian product per suite; the two groups have
different keys, so :class:`DistSuite` sweeps each group's own grid and every provider skips
the other group's shapes with the reason "not a shape of this op"; those rows are recorded
as ``skipped``):

=========  ==========================================  =====================================
profile    ring ops (N, d)                              queue ops (b, Q, d)
=========  ==========================================  =====================================
cpu        N in {512, 2048}, d = 768 (fp32)             b = 64, Q = 2048, d = 256 (fp32)
quick      N in {8192, 32768}, d = 768 (bf16)           b = 256, Q = 65536, d = 256 (bf16)
full       N in {8192, 32768, 65536}, d = 768           b = 256, Q in {57600, 65536}, d = 256
=========  ==========================================  =====================================

``--shape d=...`` sets d for both groups; ``--shape N=...`` only the ring ops; ``b``, ``Q``
only the queue ops. The summary prints, for every shape measured in this run, the ring's
time over the plain call and vlmkernels' speed-up and memory ratio against eager and compile
on the queue ops; issue 6 sets no numeric target for either.
"""

from __future__ import annotations

import atexit
import importlib
import itertools
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from . import bench_contrastive as bc
from .harness import (
    CPU_QUICK,
    BuildArgs,
    Case,
    OpSpec,
    Prepared,
    Provider,
    Results,
    RunConfig,
    Skip,
    Suite,
)

RING_MODULE = "vlmkernels.distributed.ring"
ITC_SCALE = 1 / 0.07
ALPHA = 0.4
IDS_PER_KEY = 4  # ids drawn from [0, (b + Q) / IDS_PER_KEY)

RING_OPS = {"clip_loss_dist": "clip_loss", "siglip_loss_dist": "siglip_loss"}
QUEUE_OPS = {
    # op: (teacher distillation, ids)
    "albef_itc": (False, False),
    "albef_itc_distill": (True, False),
    "blip_itc_ids": (True, True),
}
RING_KEYS = ("N", "d")
QUEUE_KEYS = ("b", "Q", "d")

# --------------------------------------------------------------------------------------
# Single-rank process group
# --------------------------------------------------------------------------------------


class _Group:
    """The single-rank group of this process: created on first use, destroyed by
    :meth:`release` (only if this module created it)."""

    def __init__(self):
        self.pg = None
        self.owned = False
        self.tmpdir: str | None = None
        self.backend = ""

    def get(self, device: torch.device):
        import torch.distributed as dist

        if self.pg is not None:
            return self.pg
        if not dist.is_available():
            raise Skip("torch.distributed is not available in this torch build")
        if dist.is_initialized():
            if dist.get_world_size() != 1:
                raise Skip(
                    f"a default process group of world size {dist.get_world_size()} exists: "
                    "run this suite in a single process"
                )
            self.pg, self.backend = dist.group.WORLD, str(dist.get_backend())
            return self.pg
        backend = "nccl" if device.type == "cuda" else "gloo"
        self.tmpdir = tempfile.mkdtemp(prefix="vlmkernels-pg-")
        store = dist.FileStore(f"{self.tmpdir}/store", 1)
        # CUDA: bind the device now, so NCCL's communicator is not created in a timed call
        bind = {}
        if backend == "nccl":
            index = device.index if device.index is not None else torch.cuda.current_device()
            bind["device_id"] = torch.device("cuda", index)
        dist.init_process_group(backend, store=store, rank=0, world_size=1, **bind)
        self.pg, self.owned, self.backend = dist.group.WORLD, True, backend
        atexit.register(self.release)
        return self.pg

    def release(self) -> None:
        if self.owned:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
            self.owned = False
        self.pg = None
        if self.tmpdir is not None:
            shutil.rmtree(self.tmpdir, ignore_errors=True)
            self.tmpdir = None


GROUP = _Group()


def ring_available(device: torch.device) -> str | None:
    """None, or the reason the ring provider cannot run: only a missing ring module (or no
    torch.distributed) makes it unavailable; a ring module that fails to import for another
    reason is left to ``build``, which records the error."""
    import torch.distributed as dist

    if not dist.is_available():
        return "torch.distributed is not available in this torch build"
    try:
        importlib.import_module(RING_MODULE)
    except ModuleNotFoundError as exc:
        if exc.name in (RING_MODULE, "vlmkernels.distributed"):
            return f"{RING_MODULE} is missing (the ring mode has not landed): {exc}"
    except Exception:  # noqa: BLE001 - reported by build as an error
        pass
    return None


# --------------------------------------------------------------------------------------
# Ring overhead: providers
# --------------------------------------------------------------------------------------


def _ring_shape_only(shape: Mapping[str, int]) -> str | None:
    if set(shape) != set(RING_KEYS):
        return "not a shape of this op (queue shape: the ALBEF/BLIP ops' grid)"
    return None


def _queue_shape_only(shape: Mapping[str, int]) -> str | None:
    if set(shape) != set(QUEUE_KEYS):
        return "not a shape of this op (ring shape: the ring ops' grid)"
    return None


def _ring_inputs(args: BuildArgs):
    reason = _ring_shape_only(args.shape)
    if reason:
        raise Skip(reason)
    return bc.make_inputs(replace(args, op=RING_OPS[args.op]))


def _backend_note(op: str, x: torch.Tensor) -> str:
    try:
        from vlmkernels.core.backend import resolve_backend

        return f"backend={resolve_backend(op, x)}"
    except Exception:  # noqa: BLE001 - informative only
        return ""


def build_plain(args: BuildArgs) -> Prepared:
    import vlmkernels

    x, y, s, b = _ring_inputs(args)
    base = RING_OPS[args.op]
    fn = getattr(vlmkernels, base)
    return Prepared(lambda: fn(x, y, s, b), bc._leaves(x, y, s, b), _backend_note(base, x))


def build_ring(args: BuildArgs) -> Prepared:
    import vlmkernels

    importlib.import_module(RING_MODULE)  # an import error here is recorded as an error
    x, y, s, b = _ring_inputs(args)
    base = RING_OPS[args.op]
    fn = getattr(vlmkernels, base)
    pg = GROUP.get(args.device)
    note = "; ".join(
        t for t in (_backend_note(base, x), f"process_group: {GROUP.backend}, world size 1") if t
    )
    return Prepared(lambda: fn(x, y, s, b, process_group=pg), bc._leaves(x, y, s, b), note)


# --------------------------------------------------------------------------------------
# ALBEF / BLIP: the eager formula and the providers
# --------------------------------------------------------------------------------------


def itc_eager(
    queries, keys, logit_scale, teacher_queries=None, alpha=0.0, query_ids=None, key_ids=None
):
    """One direction of ALBEF's / BLIP's image-text contrastive loss, as their code computes
    it: the (b, b + Q) logits, a dense fp32 target matrix (one-hot on the diagonal, or the
    positives by id spread evenly), mixed with the teacher's softmax, and
    ``-sum(log_softmax(sim, 1) * targets, 1).mean()``."""
    sim = queries @ keys.t() * logit_scale
    with torch.no_grad():
        if query_ids is None:
            targets = torch.zeros(sim.size(), device=sim.device)
            targets.fill_diagonal_(1)
        else:
            pos = torch.eq(query_ids.view(-1, 1), key_ids.view(1, -1)).float()
            targets = pos / pos.sum(1, keepdim=True)
        if teacher_queries is not None:
            sim_m = teacher_queries @ keys.t() * logit_scale
            targets = alpha * F.softmax(sim_m, dim=1) + (1 - alpha) * targets
    return -torch.sum(F.log_softmax(sim, dim=1) * targets, dim=1).mean()


@dataclass(frozen=True)
class QueueInputs:
    queries: torch.Tensor
    keys: torch.Tensor
    scale: torch.Tensor
    teacher_queries: torch.Tensor | None
    query_ids: torch.Tensor | None
    key_ids: torch.Tensor | None

    def kwargs(self) -> dict:
        return dict(
            teacher_queries=self.teacher_queries,
            alpha=ALPHA if self.teacher_queries is not None else 0.0,
            query_ids=self.query_ids,
            key_ids=self.key_ids,
        )


def make_queue_inputs(args: BuildArgs) -> QueueInputs:
    """Queries (b, d) with grad; keys (b + Q, d) without; teacher queries and ids as the op
    needs them. Seeded: every provider gets the same values."""
    reason = _queue_shape_only(args.shape)
    if reason:
        raise Skip(reason)
    b, q, d = args.shape["b"], args.shape["Q"], args.shape["d"]
    distill, with_ids = QUEUE_OPS[args.op]
    gen = torch.Generator(device=args.device).manual_seed(args.seed)

    def features(n):
        x = torch.randn(n, d, device=args.device, generator=gen, dtype=torch.float32)
        return F.normalize(x, dim=-1).to(args.dtype)

    queries = features(b).requires_grad_()
    keys = features(b + q)
    teacher = features(b) if distill else None
    q_ids = k_ids = None
    if with_ids:
        n_ids = max(1, (b + q) // IDS_PER_KEY)
        q_ids = torch.randint(n_ids, (b,), device=args.device, generator=gen)
        queue_ids = torch.randint(n_ids, (q,), device=args.device, generator=gen)
        k_ids = torch.cat([q_ids, queue_ids])
    scale = torch.tensor(ITC_SCALE, device=args.device, dtype=torch.float32, requires_grad=True)
    return QueueInputs(queries, keys, scale, teacher, q_ids, k_ids)


def build_queue_vlmkernels(args: BuildArgs) -> Prepared:
    import vlmkernels

    t = make_queue_inputs(args)
    kw = t.kwargs()
    fn = vlmkernels.contrastive_cross_entropy
    note = _backend_note("contrastive_cross_entropy", t.queries)
    return Prepared(lambda: fn(t.queries, t.keys, t.scale, **kw), (t.queries, t.scale), note)


def build_queue_eager(args: BuildArgs) -> Prepared:
    t = make_queue_inputs(args)
    kw = t.kwargs()
    return Prepared(
        lambda: itc_eager(t.queries, t.keys, t.scale, **kw),
        (t.queries, t.scale),
        "ALBEF/BLIP formula (b x (b + Q) logits and targets)",
    )


def build_queue_compile(args: BuildArgs) -> Prepared:
    backend = args.options.get("compile_backend", "inductor")
    t = make_queue_inputs(args)
    kw = t.kwargs()
    torch._dynamo.reset()
    compiled = torch.compile(itc_eager, backend=backend, dynamic=False)
    return Prepared(
        lambda: compiled(t.queries, t.keys, t.scale, **kw),
        (t.queries, t.scale),
        f"torch.compile(backend={backend}, dynamic=False); compile time excluded",
    )


# --------------------------------------------------------------------------------------
# Cost models
# --------------------------------------------------------------------------------------


def queue_flops(op: str):
    distill = QUEUE_OPS[op][0]

    def flops(shape: Mapping[str, int], mode: str) -> float:
        """2 M K d forward (+ 2 M K d teacher), 2 M K d backward; M = b, K = b + Q."""
        mkd = 2.0 * shape["b"] * (shape["b"] + shape["Q"]) * shape["d"]
        fwd = mkd * (2 if distill else 1)
        return {"fwd": fwd, "bwd": mkd, "fwd+bwd": fwd + mkd}[mode]

    return flops


def queue_nbytes(op: str):
    distill = QUEUE_OPS[op][0]

    def nbytes(shape: Mapping[str, int], mode: str, itemsize: int) -> float:
        """(M + K) d e forward (+ M d e teacher queries), (2 M + K) d e backward."""
        m, k, d = shape["b"], shape["b"] + shape["Q"], shape["d"]
        fwd = (m + k + (m if distill else 0)) * d * itemsize
        bwd = (2 * m + k) * d * itemsize
        return float({"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode])

    return nbytes


# --------------------------------------------------------------------------------------
# Shapes: one grid per group of ops
# --------------------------------------------------------------------------------------


def grids(profile: str) -> tuple[dict[str, list[int]], dict[str, list[int]]]:
    """(ring grid, queue grid) of a profile (``cpu-quick``: the first value of each key of
    each ``cpu`` grid)."""
    if profile == CPU_QUICK:
        return tuple({k: v[:1] for k, v in g.items()} for g in grids("cpu"))
    if profile == "cpu":
        return {"N": [512, 2048], "d": [768]}, {"b": [64], "Q": [2048], "d": [256]}
    if profile == "quick":
        return {"N": [8192, 32768], "d": [768]}, {"b": [256], "Q": [65536], "d": [256]}
    return (
        {"N": [8192, 32768, 65536], "d": [768]},
        {"b": [256], "Q": [57600, 65536], "d": [256]},
    )


def grid(profile: str) -> dict[str, list[int]]:
    """Every key's values over both groups (what the CPU banner prints)."""
    merged: dict[str, list[int]] = {}
    for g in grids(profile):
        for key, values in g.items():
            merged.setdefault(key, [])
            merged[key] += [v for v in values if v not in merged[key]]
    return merged


def shape_list(profile: str, overrides: Mapping[str, Sequence[int]]) -> list[dict]:
    """Ring shapes then queue shapes, each group a cartesian product of its own keys."""
    groups = [dict(g) for g in grids(profile)]
    for key, values in overrides.items():
        hit = [g for g in groups if key in g]
        if not hit:
            raise KeyError(
                f"suite contrastive_dist has no shape key {key!r} (keys: {list(grid(profile))})"
            )
        for g in hit:
            g[key] = list(values)
    return [
        dict(zip(g, combo, strict=True)) for g in groups for combo in itertools.product(*g.values())
    ]


@dataclass(frozen=True)
class DistSuite(Suite):
    """A suite whose ops come in two groups with their own shape grids."""

    def sweep(self, profile: str) -> dict[str, list[int]]:
        return grid(profile)

    def shapes(self, profile: str, overrides: Mapping[str, Sequence[int]]) -> list[dict]:
        return shape_list(profile, overrides)


# --------------------------------------------------------------------------------------
# Ops and summary
# --------------------------------------------------------------------------------------

PLAIN = Provider("vlmkernels", build_plain, limit=_ring_shape_only)
RING = Provider("vlmkernels_ring", build_ring, available=ring_available, limit=_ring_shape_only)
Q_VLMKERNELS = Provider("vlmkernels", build_queue_vlmkernels, limit=_queue_shape_only)
Q_EAGER = Provider("eager", build_queue_eager, limit=_queue_shape_only)
Q_COMPILE = Provider("compile", build_queue_compile, limit=_queue_shape_only)

OPS = (
    *(OpSpec(op, (PLAIN, RING), bc.flops, bc.nbytes) for op in RING_OPS),
    *(
        OpSpec(op, (Q_VLMKERNELS, Q_EAGER, Q_COMPILE), queue_flops(op), queue_nbytes(op))
        for op in QUEUE_OPS
    ),
)


def _measured_shapes(results: Results, op: str) -> list[tuple[tuple[str, int], ...]]:
    seen: list = []
    for r in results.records:
        if r.case.op == op and r.metric == "ms" and r.ok and r.case.shape not in seen:
            seen.append(r.case.shape)
    return seen


def _ratio(results: Results, num: Case, den: Case, metric: str) -> tuple[float | None, str]:
    a, b = results.get(num, metric), results.get(den, metric)
    if a.value is None or b.value is None:
        return None, "; ".join(x.reason for x in (a, b) if x.value is None)
    return a.value / b.value, f"{a.value:.4g} / {b.value:.4g}"


def summarize(results: Results, cfg: RunConfig) -> list[str]:
    """Ring overhead and the ALBEF/BLIP comparisons for every shape measured in this run.
    Also destroys the single-rank group if this suite created it (the run is over)."""
    GROUP.release()
    dt = next((r.case.dtype for r in results.records if r.case.dtype), "")
    lines = [f"Ring overhead ({dt}; ring = process_group of one rank; no target in issue 6):"]
    for op in RING_OPS:
        if (op, "vlmkernels_ring") in results.unavailable:
            reason = results.unavailable[(op, "vlmkernels_ring")]
            lines.append(f"  {op}: not measured (vlmkernels_ring unavailable: {reason})")
            continue
        shapes = _measured_shapes(results, op)
        if not shapes:
            lines.append(f"  {op}: not measured in this run")
        for shape in shapes:
            for mode in ("fwd", "fwd+bwd"):
                ring = Case(op, "vlmkernels_ring", mode, shape, dt)
                plain = Case(op, "vlmkernels", mode, shape, dt)
                label = f"  {op} {_s(shape)} {mode}"
                r, detail = _ratio(results, ring, plain, "ms")
                if r is None:
                    lines.append(f"{label}: not measured ({detail})")
                    continue
                lines.append(f"{label}: ring / plain = {r:.3f} ({detail} ms)")
                rm, mdetail = _ratio(results, ring, plain, "peak_mem_mb")
                if rm is not None:
                    lines[-1] += f"; memory {rm:.3f} ({mdetail} MiB)"
    lines.append(
        f"ALBEF/BLIP one direction ({dt}, fwd+bwd, time ratios > 1: vlmkernels faster; "
        "no numeric target in issue 6):"
    )
    for op in QUEUE_OPS:
        shapes = _measured_shapes(results, op)
        if not shapes:
            lines.append(f"  {op}: not measured in this run")
        for shape in shapes:
            vk = Case(op, "vlmkernels", "fwd+bwd", shape, dt)
            parts = []
            for other in ("eager", "compile"):
                r, detail = _ratio(results, Case(op, other, "fwd+bwd", shape, dt), vk, "ms")
                if r is None:
                    parts.append(f"vs {other}: not measured ({detail})")
                    continue
                txt = f"{other} / vlmkernels = {r:.2f}x ({detail} ms)"
                m, mdetail = _ratio(results, Case(op, other, "fwd+bwd", shape, dt), vk,
                                    "peak_mem_mb")  # fmt: skip
                if m is not None:
                    txt += f", memory {m:.1f}x ({mdetail} MiB)"
                parts.append(txt)
            lines.append(f"  {op} {_s(shape)}: " + "; ".join(parts))
    if cfg.device.type != "cuda":
        lines.append(
            "  (no CUDA device: a CPU sweep, fp32, small shapes: the torch backend and a "
            "gloo group; the H100 shapes are in the module docstring)"
        )
    return lines


def _s(shape) -> str:
    return ",".join(f"{k}={v}" for k, v in shape)


SUITE = DistSuite(
    name="contrastive_dist",
    ops=OPS,
    grid=grid,
    x_name="N",
    summarize=summarize,
    host_shape=dict(zip(QUEUE_KEYS, (8, 16, 32), strict=True)),  # the queue ops' host budget
)
