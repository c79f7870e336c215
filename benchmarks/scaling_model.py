r"""Scaling model of the ring-parallel CLIP loss on 8 and 64 GPUs (issue 6): does the ring's
communication hide under the per-step kernel, and what does a rank hold in memory, against
open_clip's gather?

``python -m benchmarks.scaling_model --csv benchmarks/results/contrastive.csv`` prints two
markdown tables (time per step, memory per rank); ``--out-csv FILE`` also writes them as CSV.
Pure arithmetic on the standard library: no torch, no GPU.

Everything below is a MODEL. The only measured input is the single-GPU kernel time read from
the CSV, and only when that CSV holds CUDA rows; otherwise an explicitly labelled ASSUMED
rate is used and the output says so.

Ring schedule (``vlmkernels/distributed/ring.py``): P ranks, local batch b = N / P; rank p
holds text block j = p - k at step k = 0 .. P - 1 and computes the (b x b) block (p, j).

- Forward (one rotation, both CLIP directions): at the start of a step the text block
  (b x d, bf16) is posted to rank p + 1 with ``batch_isend_irecv`` and waited for at the
  start of the next step; the column statistics of the block (lse, positive sum, positive
  count: 3 fp32 per column) are posted after the step's kernel and waited for after the next
  step's kernel. Packet per step: ``b d e + 12 b`` bytes.
- Backward (second rotation): the text block travels with its column coefficients (6 fp32 per
  column), posted at the start of the step; the fp32 dY accumulator of the block (b x d) is
  posted after the kernel, after the received accumulator has been added to this step's
  share (``dy.add_(received)``: 12 b d bytes of HBM traffic on the compute stream, counted as
  compute here), and waited for after the next kernel. Packet per step:
  ``b d e + 24 b + 4 b d`` bytes.
- Both transfers of a step are in flight during one kernel, so communication hides when
  ``t_comm = bytes / (bandwidth x efficiency) + 2 x latency <= t_compute`` (two
  ``batch_isend_irecv`` batches per step; their latencies are added, pessimistically).
- Time per call: ``t_c + (P - 1) max(t_c, t_m) + last hop`` per rotation: the first step has
  nothing to wait for, and the last accumulator (forward: the column statistics; backward:
  the fp32 dY block) makes one more hop home with no kernel left to hide it. Exposed
  communication is that time minus ``P t_c``.

Compute per step (one b x b block, d):

- Measured (preferred): the fwd and fwd+bwd median times of ``clip_loss`` / ``vlmkernels`` in
  bf16 on CUDA from the CSV (latest run that has them), at the measured N closest to b (log
  scale), preferring the requested d; scaled by FLOPs: ``t(b, d) = t(N_m, d_m) (b^2 d) /
  (N_m^2 d_m)``. The backward step is p50(fwd+bwd) - p50(fwd); without a fwd row the
  fwd+bwd time is split 1 : 3 (the kernels' product count: a statistics pass, then
  recompute, dX, dY). A block smaller than every measured N is extrapolated (marked ``*``):
  small blocks fill the GPU worse, so the true compute time is longer and communication
  hides more easily than the table says.
- Assumed (only when the CSV has no CUDA measurement): ``--assumed-tflops`` (default 550
  TFLOP/s, not a measurement) on the products the kernels perform: 2 b^2 d forward, 6 b^2 d
  backward. The HBM rate for the accumulator add is the CSV's measured copy ceiling of the
  same run if there is one, else ``--assumed-hbm-gbs`` (default 3000 GB/s, not measured).

Links (assumptions, all overridable): 8 GPUs = one node, every hop NVLink: 900 GB/s per GPU
is NVLink 4's total over both directions, so 450 GB/s each way; a ring step sends one packet
out and receives one in on each GPU, one per direction. 64 GPUs = 8 nodes of 8, ranks
ordered node by node: 7 of every 8 hops are NVLink and one crosses nodes on InfiniBand, 400
Gb/s = 50 GB/s each way per GPU (one NIC per GPU); the step waits for the slowest hop, so
the IB hop sets the pace. Achieved fraction of the link: ``--link-efficiency`` (default 0.8,
assumed). Latency per message (a ``batch_isend_irecv``, including NCCL's launch): 10 us on
NVLink, 20 us across IB (assumed). Features bf16 (e = 2), d = 768. NCCL's own kernels
share the SMs with the loss kernel; that slowdown is not modelled.

open_clip's gather (``ClipLoss(local_loss=True, gather_with_grad=True)``) for comparison:
``torch.distributed.nn.all_gather`` of the image and the text features before the loss
(synchronous), and in the backward pass a reduce-scatter of the same size for each: four
ring collectives at the slowest hop, each ``(P - 1) b d e / (bandwidth x efficiency) +
latency`` (one latency per collective: generous to open_clip), all of it exposed.

Memory per rank (sums of buffers: upper bounds on the ring's peak, lower bounds on
open_clip's; MiB = 2^20 bytes):

- ring: features X, Y (2 b d e) + their gradients (2 b d e) + fp32 dX (4 b d) + three fp32
  dY blocks (the step's share, the one received, the one in flight: 12 b d) + two text
  blocks (the one computed on, the one arriving: 2 b d e) + one dS chunk (min(b^2 e,
  ``--chunk-mib``, default 128 MiB, the kernels' default budget)) + O(b) statistics and
  coefficients (30 b fp32).
- open_clip local_loss: features and gradients (4 b d e) + the gathered features (2 N d e)
  + the b x N logits of both directions in the activation dtype (2 b N e). Autograd also
  keeps the log-softmax outputs and the backward pass allocates the logit gradients (each
  another 2 b N e), not counted.
- open_clip without local_loss: features and gradients + gathered features + the N x N
  logits (N^2 e; ``logits_per_text`` is its transposed view), same omissions.
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path

GPUS = (8, 64)
BATCHES = (32768, 65536, 131072, 262144, 524288, 1048576)
D = 768
ELEM = 2  # bf16
MIB = 1 << 20

# Column statistics and coefficients travelling with a text block, fp32 per column.
FWD_STATS_PER_COL = 3  # lse, sum of S over positives, positive count (no label smoothing)
BWD_COEF_PER_COL = 6
STATE_FLOATS_PER_ROW = 30  # saved stats, coefficients, packets of them: O(b), generous


@dataclass(frozen=True)
class Link:
    name: str
    gbs: float  # GB/s per direction, nominal
    latency_us: float


@dataclass(frozen=True)
class Assumptions:
    nvlink: Link = Link("NVLink", 450.0, 10.0)
    ib: Link = Link("InfiniBand", 50.0, 20.0)
    gpus_per_node: int = 8
    efficiency: float = 0.8
    d: int = D
    elem: int = ELEM
    chunk_bytes: int = 128 * MIB
    assumed_tflops: float = 550.0
    assumed_hbm_gbs: float = 3000.0

    def slowest_link(self, gpus: int) -> Link:
        return self.nvlink if gpus <= self.gpus_per_node else self.ib


# --------------------------------------------------------------------------------------
# Compute per step
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Measured:
    n: int
    d: int
    fwd_ms: float | None
    fwd_bwd_ms: float
    device: str
    run_id: str


@dataclass(frozen=True)
class ComputeRate:
    """Per-block kernel times: measured (scaled from ``points``) or from an assumed rate."""

    points: tuple[Measured, ...] = ()
    assumed_tflops: float = 550.0
    hbm_gbs: float = 3000.0
    hbm_measured: bool = False
    reason: str = ""

    @property
    def measured(self) -> bool:
        return bool(self.points)

    def _nearest(self, b: int, d: int) -> Measured:
        same_d = [p for p in self.points if p.d == d] or list(self.points)
        return min(same_d, key=lambda p: (abs(math.log(b / p.n)), -p.n))

    def block_seconds(self, b: int, d: int) -> tuple[float, float, bool]:
        """(forward, backward) seconds of one b x b block at d, and whether b lies below
        every measured N (extrapolated)."""
        if not self.measured:
            flop = b * b * d / (self.assumed_tflops * 1e12)
            return 2 * flop, 6 * flop, False
        p = self._nearest(b, d)
        factor = (b * b * d) / (p.n * p.n * p.d)
        if p.fwd_ms is not None and p.fwd_bwd_ms > p.fwd_ms:
            fwd, bwd = p.fwd_ms, p.fwd_bwd_ms - p.fwd_ms
        else:
            fwd, bwd = p.fwd_bwd_ms / 4, 3 * p.fwd_bwd_ms / 4
        below = b < min(q.n for q in self.points)
        return fwd * 1e-3 * factor, bwd * 1e-3 * factor, below

    def describe(self) -> str:
        hbm = (
            f"HBM {self.hbm_gbs:.0f} GB/s (measured copy ceiling of the same run)"
            if self.hbm_measured
            else f"HBM {self.hbm_gbs:.0f} GB/s (ASSUMED)"
        )
        if not self.measured:
            return (
                f"compute: ASSUMED {self.assumed_tflops:g} TFLOP/s on 2 b^2 d (fwd) + 6 b^2 d "
                f"(bwd) FLOPs, not measured ({self.reason}); {hbm}"
            )
        pts = ", ".join(
            f"N={p.n} d={p.d}: fwd {p.fwd_ms if p.fwd_ms is not None else '-'} ms, "
            f"fwd+bwd {p.fwd_bwd_ms} ms"
            for p in self.points
        )
        p0 = self.points[0]
        return (
            f"compute: MEASURED clip_loss vlmkernels bf16 on {p0.device} (run {p0.run_id}; "
            f"{pts}), scaled by b^2 d from the nearest measured N; {hbm}"
        )


def load_rate(path: Path | None, a: Assumptions) -> ComputeRate:
    """The latest CUDA bf16 run of ``clip_loss`` / ``vlmkernels`` in ``path`` (a results CSV
    of the contrastive suite), or the assumed rate with the reason none was usable."""
    base = dict(assumed_tflops=a.assumed_tflops, hbm_gbs=a.assumed_hbm_gbs)
    if path is None:
        return ComputeRate(reason="no --csv given", **base)
    if not path.exists():
        return ComputeRate(reason=f"{path} does not exist", **base)
    with path.open(newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("device_type") == "cuda"]
    runs: dict[str, dict] = {}
    copy: dict[str, float] = {}
    for r in rows:
        if r["op"] == "ceiling" and r["metric"] == "copy_gbps" and r["status"] == "ok":
            copy[r["run_id"]] = float(r["p50"])
        if (
            r["op"] == "clip_loss"
            and r["provider"] == "vlmkernels"
            and r["dtype"] == "bfloat16"
            and r["metric"] == "ms"
            and r["status"] == "ok"
            and r["mode"] in ("fwd", "fwd+bwd")
        ):
            shape = dict(kv.split("=") for kv in r["shape"].split(","))
            key = (int(shape["N"]), int(shape["d"]))
            run = runs.setdefault(r["run_id"], {"device": r.get("device", ""), "ts": ""})
            run.setdefault(key, {})[r["mode"]] = float(r["p50"])
            run["ts"] = max(run["ts"], r["timestamp"])
    usable = {
        rid: run
        for rid, run in runs.items()
        if any(isinstance(k, tuple) and "fwd+bwd" in v for k, v in run.items())
    }
    if not usable:
        return ComputeRate(
            reason=f"{path} has no CUDA bf16 fwd+bwd row of clip_loss/vlmkernels", **base
        )
    rid, run = max(usable.items(), key=lambda kv: kv[1]["ts"])
    points = tuple(
        Measured(n, d, modes.get("fwd"), modes["fwd+bwd"], run["device"], rid)
        for (n, d), modes in sorted((k, v) for k, v in run.items() if isinstance(k, tuple))
        if "fwd+bwd" in modes
    )
    if rid in copy:
        base.update(hbm_gbs=copy[rid])
        return ComputeRate(points, hbm_measured=True, **base)
    return ComputeRate(points, **base)


# --------------------------------------------------------------------------------------
# Communication and time per call
# --------------------------------------------------------------------------------------


def packet_bytes(b: int, d: int, elem: int, phase: str) -> int:
    """Bytes one rank sends (and receives) per ring step."""
    if phase == "fwd":
        return b * d * elem + 4 * FWD_STATS_PER_COL * b
    return b * d * elem + 4 * BWD_COEF_PER_COL * b + 4 * b * d


def transfer_seconds(nbytes: float, link: Link, efficiency: float, messages: int) -> float:
    return nbytes / (link.gbs * 1e9 * efficiency) + messages * link.latency_us * 1e-6


@dataclass(frozen=True)
class TimeRow:
    gpus: int
    link: str
    n: int
    b: int
    fwd_compute_us: float
    fwd_comm_us: float
    fwd_hidden: bool
    bwd_compute_us: float
    bwd_comm_us: float
    bwd_hidden: bool
    ring_ms: float
    exposed_ms: float
    open_clip_comm_ms: float
    breakeven_gbs: float  # link bandwidth (per direction, achieved) at which bwd comm = compute
    extrapolated: bool


def time_row(gpus: int, n: int, a: Assumptions, rate: ComputeRate) -> TimeRow:
    b, d, e = n // gpus, a.d, a.elem
    link = a.slowest_link(gpus)
    c_f, c_b, extrapolated = rate.block_seconds(b, d)
    c_b += 12 * b * d / (rate.hbm_gbs * 1e9)  # dY += received accumulator (fp32)
    m_f = transfer_seconds(packet_bytes(b, d, e, "fwd"), link, a.efficiency, 2)
    m_b = transfer_seconds(packet_bytes(b, d, e, "bwd"), link, a.efficiency, 2)
    last_f = transfer_seconds(4 * FWD_STATS_PER_COL * b, link, a.efficiency, 1)
    last_b = transfer_seconds(4 * b * d, link, a.efficiency, 1)
    t_f = c_f + (gpus - 1) * max(c_f, m_f) + last_f
    t_b = c_b + (gpus - 1) * max(c_b, m_b) + last_b
    exposed = t_f + t_b - gpus * (c_f + c_b)
    # open_clip: all_gather of X and of Y (forward), reduce-scatter of both (backward)
    oc = 4 * transfer_seconds((gpus - 1) * b * d * e, link, a.efficiency, 1)
    lat_b = 2 * link.latency_us * 1e-6
    bw = packet_bytes(b, d, e, "bwd") / (c_b - lat_b) / 1e9 if c_b > lat_b else math.inf
    return TimeRow(
        gpus,
        link.name,
        n,
        b,
        c_f * 1e6,
        m_f * 1e6,
        m_f <= c_f,
        c_b * 1e6,
        m_b * 1e6,
        m_b <= c_b,
        (t_f + t_b) * 1e3,
        exposed * 1e3,
        oc * 1e3,
        bw,
        extrapolated,
    )


# --------------------------------------------------------------------------------------
# Memory per rank
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MemoryRow:
    gpus: int
    n: int
    b: int
    ring_mib: float
    ring_chunk_mib: float
    open_clip_local_mib: float
    open_clip_plain_mib: float
    local_over_ring: float


def ring_bytes(b: int, d: int, e: int, chunk_bytes: int) -> tuple[int, int]:
    """(total, dS chunk) bytes per rank of the ring (sum of buffers)."""
    chunk = min(b * b * e, chunk_bytes)
    total = (
        2 * b * d * e  # features X, Y
        + 2 * b * d * e  # their gradients
        + 4 * b * d  # fp32 dX
        + 3 * 4 * b * d  # fp32 dY: the step's share, received, in flight
        + 2 * b * d * e  # text blocks: computed on, arriving
        + chunk
        + 4 * STATE_FLOATS_PER_ROW * b
    )
    return total, chunk


def open_clip_bytes(n: int, b: int, d: int, e: int, local_loss: bool) -> int:
    """Lower bound per rank of open_clip's gather: features and grads, gathered features,
    logits (b x N both directions with local_loss, else N x N)."""
    logits = 2 * b * n * e if local_loss else n * n * e
    return 4 * b * d * e + 2 * n * d * e + logits


def memory_row(gpus: int, n: int, a: Assumptions) -> MemoryRow:
    b = n // gpus
    ring, chunk = ring_bytes(b, a.d, a.elem, a.chunk_bytes)
    local = open_clip_bytes(n, b, a.d, a.elem, True)
    plain = open_clip_bytes(n, b, a.d, a.elem, False)
    return MemoryRow(gpus, n, b, ring / MIB, chunk / MIB, local / MIB, plain / MIB, local / ring)


# --------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------


def _k(n: int) -> str:
    return f"{n // 1048576}M" if n % 1048576 == 0 else f"{n // 1024}k"


def _num(v: float) -> str:
    if math.isinf(v):
        return "inf"
    if v >= 100:
        return f"{v:,.0f}"
    if v >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}" if v >= 0.1 else f"{v:.3f}"


def _mem(mib: float) -> str:
    if mib >= 1024:
        return f"{mib / 1024:,.1f} GiB"
    return f"{mib:,.0f} MiB" if mib >= 10 else f"{mib:.1f} MiB"


def time_table(rows: Sequence[TimeRow]) -> str:
    head = (
        "| GPUs | slowest hop | N | b | fwd step: compute / comm (us) | hidden | "
        "bwd step: compute / comm (us) | hidden | ring fwd+bwd (ms) | of which exposed comm "
        "(ms) | open_clip gather + reduce-scatter, exposed (ms) | bwd hides from (achieved GB/s) |"
    )
    out = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for r in rows:
        star = "*" if r.extrapolated else ""
        out.append(
            f"| {r.gpus} | {r.link} | {_k(r.n)} | {r.b}{star} | {_num(r.fwd_compute_us)} / "
            f"{_num(r.fwd_comm_us)} | {'yes' if r.fwd_hidden else 'no'} | "
            f"{_num(r.bwd_compute_us)} / {_num(r.bwd_comm_us)} | "
            f"{'yes' if r.bwd_hidden else 'no'} | {_num(r.ring_ms)} | {_num(r.exposed_ms)} | "
            f"{_num(r.open_clip_comm_ms)} | {_num(r.breakeven_gbs)} |"
        )
    return "\n".join(out)


def memory_table(rows: Sequence[MemoryRow]) -> str:
    head = (
        "| GPUs | N | b | ring per rank (of which dS chunk) | open_clip local_loss (lower "
        "bound) | open_clip plain (lower bound) | local_loss / ring |"
    )
    out = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for r in rows:
        out.append(
            f"| {r.gpus} | {_k(r.n)} | {r.b} | {_mem(r.ring_mib)} ({_mem(r.ring_chunk_mib)}) | "
            f"{_mem(r.open_clip_local_mib)} | {_mem(r.open_clip_plain_mib)} | "
            f"{r.local_over_ring:,.0f}x |"
        )
    return "\n".join(out)


def assumptions_text(a: Assumptions, rate: ComputeRate) -> str:
    return "\n".join(
        [
            "MODELLED, not measured. Assumptions:",
            f"- {rate.describe()}",
            f"- features bf16 (e = {a.elem}), d = {a.d}; CLIP loss, no ids, no label smoothing",
            f"- 8 GPUs: one node, slowest hop {a.nvlink.name} {a.nvlink.gbs:g} GB/s per "
            f"direction (900 GB/s both ways), {a.nvlink.latency_us:g} us per message",
            f"- 64 GPUs: 8 nodes x {a.gpus_per_node}, slowest hop {a.ib.name} "
            f"{a.ib.gbs:g} GB/s per direction (400 Gb/s per GPU), {a.ib.latency_us:g} us per "
            "message",
            f"- achieved fraction of link bandwidth {a.efficiency:g} (assumed); 2 messages per "
            "ring step, latencies added; NCCL's SM use not modelled",
            f"- dS chunk budget {a.chunk_bytes / MIB:g} MiB; memory = sums of buffers",
            "- * = block smaller than every measured N: compute extrapolated (optimistic)",
        ]
    )


def run(
    csv_path: Path | None,
    a: Assumptions,
    gpus: Sequence[int] = GPUS,
    batches: Sequence[int] = BATCHES,
) -> tuple[ComputeRate, list[TimeRow], list[MemoryRow]]:
    rate = load_rate(csv_path, a)
    times = [time_row(p, n, a, rate) for p in gpus for n in batches]
    mems = [memory_row(p, n, a) for p in gpus for n in batches]
    return rate, times, mems


def write_csv(path: Path, times: Sequence[TimeRow], mems: Sequence[MemoryRow], source: str):
    path.parent.mkdir(parents=True, exist_ok=True)
    mem_by = {(m.gpus, m.n): m for m in mems}
    names = [f.name for f in fields(TimeRow)] + [
        f.name for f in fields(MemoryRow) if f.name not in ("gpus", "n", "b")
    ]
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow([*names, "compute_source"])
        for t in times:
            m = mem_by[(t.gpus, t.n)]
            vals = [getattr(t, k) if hasattr(t, k) else getattr(m, k) for k in names]
            w.writerow([*vals, source])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.scaling_model",
        description="Modelled ring-loss scaling on 8 and 64 GPUs (see the module docstring).",
    )
    p.add_argument("--csv", type=Path, help="results CSV with CUDA clip_loss rows")
    p.add_argument("--d", type=int, default=D)
    p.add_argument("--gpus", default=",".join(map(str, GPUS)))
    p.add_argument("--batches", default=",".join(map(str, BATCHES)))
    p.add_argument("--assumed-tflops", type=float, default=550.0)
    p.add_argument("--assumed-hbm-gbs", type=float, default=3000.0)
    p.add_argument("--nvlink-gbs", type=float, default=450.0, help="per direction")
    p.add_argument("--ib-gbs", type=float, default=50.0, help="per direction")
    p.add_argument("--nvlink-latency-us", type=float, default=10.0)
    p.add_argument("--ib-latency-us", type=float, default=20.0)
    p.add_argument("--link-efficiency", type=float, default=0.8)
    p.add_argument("--chunk-mib", type=float, default=128.0)
    p.add_argument("--out-csv", type=Path, help="also write the rows as CSV")
    args = p.parse_args(argv)
    a = Assumptions(
        nvlink=Link("NVLink", args.nvlink_gbs, args.nvlink_latency_us),
        ib=Link("InfiniBand", args.ib_gbs, args.ib_latency_us),
        efficiency=args.link_efficiency,
        d=args.d,
        chunk_bytes=int(args.chunk_mib * MIB),
        assumed_tflops=args.assumed_tflops,
        assumed_hbm_gbs=args.assumed_hbm_gbs,
    )
    gpus = [int(x) for x in args.gpus.split(",")]
    batches = [int(x) for x in args.batches.split(",")]
    rate, times, mems = run(args.csv, a, gpus, batches)
    print(assumptions_text(a, rate))
    print("\nTime per rank per CLIP loss call (modelled)\n")
    print(time_table(times))
    print("\nMemory per rank (modelled)\n")
    print(memory_table(mems))
    if args.out_csv:
        write_csv(args.out_csv, times, mems, rate.describe())
        print(f"\nwrote {args.out_csv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
