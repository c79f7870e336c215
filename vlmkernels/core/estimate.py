"""A static time model for inspected kernels (:mod:`.inspection` records) at the benchmark
shapes: what the SASS and the device's rates imply, not a measurement.

Workloads come from the budget file's ``workloads`` (per compile case, a list of shapes):

- ``{"shape": label, "M", "N", "K", "out_bytes"}`` for a kernel over the tiles of an M x N
  product with reduction length K (``out_bytes``: bytes written per output element;
  optional ``products``: how many BM x BN x K products each tile runs, default 1);
- ``{"shape": label, "programs", "bytes", "trips": {"count", "per"}}`` for a memory-bound
  kernel: ``programs`` program instances moving ``bytes`` in all, each running its hot loop
  ceil(count / config[per]) times.

The model, per device (:data:`DEVICES`, all numbers printed with the estimates):

- tensor clocks per tile: products x 2 BM BN K flops at the tensor cores' dense rate per SM
  per clock
  (16-bit inputs; fp32 inputs run "tf32x3": three TF32 products at half that rate);
- issue clocks per tile: warps x executed instructions / 4 (four schedulers, one warp
  instruction each per clock), executed = the tile region + (ceil(K / BK) - 1) x its inner
  loops (the k-loop body runs once per K / BK step);
- MUFU clocks: warps x MUFU instructions x 32 lanes / 16 per clock;
- tiles spread evenly over every SM (no tail wave, no grid cap): time = tiles x clocks /
  (SMs x clock rate); the estimate is the range from max(tensor, issue, MUFU) (perfect
  overlap) to tensor + issue (none), and never below bytes / copy bandwidth;
- memory-bound kernels: max(bytes / copy bandwidth, issue time of every program);
- attention-like kernels (``{"shape", "programs", "trips": {"count", "per"},
  "mma_flops_per_score", "bytes"}``): each of ``programs`` programs runs
  t = ceil(count / config[per]) trips of its loop over BM x BN score tiles; per program,
  tensor clocks t BM BN mma_flops_per_score / rate (padded tiles included), issue clocks
  warps x (the program's instructions + (t - 1) x its smallest inner loop: the full-block
  loop where a masked copy serves the boundary blocks) / 4, MUFU clocks
  t BM BN mufu_per_score (default 1, one exp2 per score) / 16; programs spread evenly over
  the SMs; the range as for the tile kernels, never below bytes / copy bandwidth.
"""

from __future__ import annotations

import math

__all__ = ["DEVICES", "assumptions", "estimate"]

# clock: the clock at which 132 SMs x 4096 flop/clock give the datasheet's 989 TFLOP/s
# dense bf16 (the H100 SXM's; the H200 has the same SMs and rates). copy_tb_s: H200, a
# device-to-device copy measured on this workplace's H200 (KINDS.md, 2026-10-28: 4.3 TB/s,
# bytes read + written); H100, 90% of the 3.35 TB/s datasheet figure (not measured here).
DEVICES = {
    "H100": dict(sms=132, clock_ghz=1.83, mma_flop_per_clk=4096, copy_tb_s=3.0),
    "H200": dict(sms=132, clock_ghz=1.83, mma_flop_per_clk=4096, copy_tb_s=4.3),
}
ISSUE_PER_CLK = 4  # warp instructions per SM per clock
MUFU_PER_CLK = 16  # special-function results per SM per clock


def assumptions() -> list[str]:
    """The model's numbers, one line each, for printing beside the estimates."""
    lines = [
        f"{name}: {d['sms']} SMs at {d['clock_ghz']} GHz, tensor cores "
        f"{d['mma_flop_per_clk']} flop/clock/SM dense 16-bit "
        f"({d['sms'] * d['mma_flop_per_clk'] * d['clock_ghz'] / 1e3:.0f} TFLOP/s; fp32 inputs: "
        f"tf32x3 at a sixth), copy bandwidth {d['copy_tb_s']} TB/s"
        for name, d in DEVICES.items()
    ]
    return lines + [
        f"issue {ISSUE_PER_CLK} warp instructions/clock/SM, MUFU {MUFU_PER_CLK} lanes/clock/SM; "
        "tiles spread evenly over all SMs (no tail wave, no grid cap); range = perfect overlap "
        "of tensor and issue clocks .. none; never below bytes / copy bandwidth",
        "H200 copy bandwidth measured here (KINDS.md); H100's assumed (90% of datasheet); "
        "the measured H100 GEMM anchors (issue 14) reached 53-69% of the tensor peak",
    ]


def _tile(kw: dict) -> tuple[int, int, int]:
    """(BM, BN, BK) of a config, whether named BM or BLOCK_M (BK 0 where it has none)."""
    return tuple(kw.get(n, kw.get(f"BLOCK_{n[1]}", 0)) for n in ("BM", "BN", "BK"))


def _mma_rate(record: dict, dev: dict) -> float:
    """Tensor-core flops per SM per clock for the record's inputs (fp32: tf32x3)."""
    return dev["mma_flop_per_clk"] / (6 if record["dtype"] == "fp32" else 1)


def _range(tensor: float, issue: float, mufu: float, memory_ms: float, to_ms: float) -> dict:
    """The estimate from per-unit clocks: perfect overlap .. none, never below the bytes."""
    low = max(tensor, issue, mufu) * to_ms
    high = (tensor + issue) * to_ms
    bound = max(("tensor", tensor), ("issue", issue), ("MUFU", mufu), key=lambda t: t[1])[0]
    if memory_ms > low:
        bound = "memory"
    return dict(tensor_ms=tensor * to_ms, issue_ms=issue * to_ms, mufu_ms=mufu * to_ms,
                memory_ms=memory_ms, low_ms=max(low, memory_ms), high_ms=max(high, memory_ms),
                bound=bound)  # fmt: skip


def _gemm(record: dict, work: dict, dev: dict) -> dict:
    bm, bn, bk = _tile(record["constexprs"])
    m, n, k = work["M"], work["N"], work["K"]
    tiles = math.ceil(m / bm) * math.ceil(n / bn)
    tensor = work.get("products", 1) * 2 * bm * bn * k / _mma_rate(record, dev)
    executed = (
        record["instructions_per_tile"]
        + (math.ceil(k / bk) - 1) * record["inner_loop_instructions"]
    )
    issue = record["num_warps"] * executed / ISSUE_PER_CLK
    mufu = record["num_warps"] * record["mix"].get("MUFU", 0) * 32 / MUFU_PER_CLK
    to_ms = tiles / (dev["sms"] * dev["clock_ghz"] * 1e6)
    elem = 4 if record["dtype"] == "fp32" else 2
    moved = m * n * work.get("out_bytes", 0) + (m + n) * k * elem
    return _range(tensor, issue, mufu, moved / (dev["copy_tb_s"] * 1e9), to_ms)


def _memory(record: dict, work: dict, dev: dict) -> dict:
    trips = work.get("trips")
    loops = 1
    if trips and record["region"] == "loop":
        loops = math.ceil(trips["count"] / record["constexprs"].get(trips["per"], 1))
    executed = record["instructions_total"] + (loops - 1) * record["instructions_per_tile"]
    issue = work["programs"] * record["num_warps"] * executed / ISSUE_PER_CLK
    issue_ms = issue / (dev["sms"] * dev["clock_ghz"] * 1e6)
    memory = work["bytes"] / (dev["copy_tb_s"] * 1e9)
    est = max(issue_ms, memory)
    return dict(issue_ms=issue_ms, memory_ms=memory, low_ms=est, high_ms=est,
                bound="memory" if memory >= issue_ms else "issue")  # fmt: skip


def _looped(record: dict, work: dict, dev: dict) -> dict:
    kw = record["constexprs"]
    bm, bn, _ = _tile(kw)
    trips = math.ceil(work["trips"]["count"] / kw[work["trips"]["per"]])
    scores = trips * bm * bn
    tensor = scores * work["mma_flops_per_score"] / _mma_rate(record, dev)
    # per trip: the smallest innermost loop, the full-block loop of a kernel that also has
    # a masked copy for the boundary blocks (counted once in the program's instructions)
    per_trip = min(record.get("inner_loops") or [record["inner_loop_instructions"]])
    executed = record["instructions_total"] + (trips - 1) * per_trip
    issue = record["num_warps"] * executed / ISSUE_PER_CLK
    mufu = scores * work.get("mufu_per_score", 1) / MUFU_PER_CLK
    to_ms = work["programs"] / (dev["sms"] * dev["clock_ghz"] * 1e6)
    return _range(tensor, issue, mufu, work["bytes"] / (dev["copy_tb_s"] * 1e9), to_ms)


def estimate(record: dict, workloads: list[dict]) -> list[dict]:
    """Per workload and device: {"shape", "device", "low_ms", "high_ms", "bound", and the
    terms}; nothing for a record that did not compile or a workload of the other dtype
    (``"dtype"`` in a workload restricts it)."""
    if "error" in record:
        return []
    out = []
    for work in workloads:
        if work.get("dtype", record["dtype"]) != record["dtype"]:
            continue
        if "K" in work:
            model = _gemm
        elif "mma_flops_per_score" in work:
            model = _looped
        else:
            model = _memory
        for name, dev in DEVICES.items():
            terms = model(record, work, dev)
            out.append(dict(shape=work["shape"], device=name,
                            **{k: float(f"{v:.4g}") if isinstance(v, float) else v
                               for k, v in terms.items()}))  # fmt: skip
    return out
