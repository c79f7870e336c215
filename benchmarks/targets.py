"""The issues' targets, in one place: what the suites' summaries judge a run against.

A :class:`Target` names the suite and op, the provider measured, the mode, the shape, the
metric and its bound: a ratio to a baseline provider (``ms`` of vlmkernels over ``ms`` of
``compile`` <= 0.9), a level (``pct_copy_ceiling`` >= 90), "runs where the baseline is out of
memory", or a host-time budget (``host_us`` <= 25, with the eager formula's time reported
beside it); and the issue that set it. The suites' summaries (``summarize``) and the host
mode (:mod:`benchmarks.host`) read :func:`for_suite` instead of keeping constants of their
own, so changing a target, or adding one for a new family, is an edit of this file.

The time, memory and bandwidth targets are GPU targets (H100 / H200, bfloat16, the shapes
below); a CPU run prints them as "not measured". The host budgets are per call on the CPU
(:mod:`benchmarks.host`: float32 CPU tensors, Triton's launcher stubbed), so a CPU machine
judges them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from .harness import Case, Lookup, Results

LE, GE = "<=", ">="
RUNS_WHERE_OOM = "runs where out of memory"
BF16 = "bfloat16"


@dataclass(frozen=True)
class Target:
    """One target of one issue.

    suite, op, provider, mode, shape: the case measured (``shape`` as (key, value) pairs;
    empty for a host budget, which holds at the host mode's small shape).
    metric: the metric judged (``ms``, ``peak_mem_mb``, ``pct_copy_ceiling``, ``host_us``).
    relation, bound: the bound, ``<=`` or ``>=`` (or :data:`RUNS_WHERE_OOM`: the provider
    runs where ``baseline`` is out of memory); ``bound_text`` writes it ("1/3").
    baseline: the denominator of a ratio metric(provider) / metric(baseline); None: the
    metric itself is bounded.
    beside: a provider reported next to the measured one, not judged (host budgets: the
    eager formula).
    dtype: the dtype of the case; None: the run's (ops whose inputs are integers).
    """

    suite: str
    op: str
    provider: str
    metric: str
    relation: str
    bound: float
    issue: int
    mode: str = "fwd+bwd"
    shape: tuple[tuple[str, int], ...] = ()
    baseline: str | None = None
    beside: str | None = None
    dtype: str | None = BF16
    bound_text: str = ""

    @property
    def text(self) -> str:
        """The bound as printed: ``<= 0.9``, ``>= 90``, ``<= 1/3``."""
        return f"{self.relation} {self.bound_text or format(self.bound, 'g')}"

    @property
    def shape_dict(self) -> dict[str, int]:
        return dict(self.shape)

    def case(self, provider: str | None = None, dtype: str | None = None) -> Case:
        """The case of ``provider`` (default the measured one) at the target's mode and shape;
        ``dtype`` is used when the target has none."""
        return Case(self.op, provider or self.provider, self.mode, self.shape,
                    self.dtype or dtype or "")  # fmt: skip

    def hit(self, value: float) -> bool:
        return value <= self.bound if self.relation == LE else value >= self.bound

    def evaluate(self, results: Results, dtype: str | None = None) -> Verdict:
        """The measured value (a ratio where there is a baseline) and whether it meets the
        bound, or why it was not measured, from ``results`` alone."""
        num = results.get(self.case(dtype=dtype), self.metric)
        den = results.get(self.case(self.baseline, dtype), self.metric) if self.baseline else None
        missing = [x for x in (num, den) if x is not None and x.value is None]
        if missing:
            return Verdict(self, None, num, den, "; ".join(x.reason for x in missing))
        value = num.value / den.value if den is not None else num.value
        return Verdict(self, value, num, den, "")


@dataclass(frozen=True)
class Verdict:
    target: Target
    value: float | None
    num: Lookup
    den: Lookup | None
    reason: str

    @property
    def measured(self) -> bool:
        return self.value is not None

    @property
    def hit(self) -> bool:
        return self.value is not None and self.target.hit(self.value)


def _shape(**keys: int) -> tuple[tuple[str, int], ...]:
    return tuple(keys.items())


# --------------------------------------------------------------------------------------
# Issue 3: the fused contrastive losses (H100, N=32768, d=768, bf16, forward+backward)
# --------------------------------------------------------------------------------------

_CLIP = dict(suite="contrastive", op="clip_loss", issue=3, shape=_shape(N=32768, d=768))
CONTRASTIVE = (
    Target(**_CLIP, provider="vlmkernels", metric="ms", relation=LE, bound=0.9,
           baseline="compile"),
    Target(**_CLIP, provider="vlmkernels", metric="peak_mem_mb", relation=LE, bound=0.05,
           baseline="compile"),
    Target(**_CLIP, provider="inf_cl", metric="ms", relation=GE, bound=30,
           baseline="vlmkernels"),
    Target(suite="contrastive", op="siglip_loss", issue=3, shape=_shape(N=32768, d=768),
           provider="vlmkernels", metric="ms", relation=LE, bound=0.8, baseline="compile"),
    # at N = 65536 (every d measured; d = 768 when none) clip_loss runs where eager is OOM
    Target(suite="contrastive", op="clip_loss", issue=3, shape=_shape(N=65536, d=768),
           provider="vlmkernels", metric="ms", relation=RUNS_WHERE_OOM, bound=0,
           baseline="eager"),
)  # fmt: skip

# --------------------------------------------------------------------------------------
# Issue 4: M-RoPE (H100, mrope on Qwen2-VL-7B shapes, B=1, bf16) and get_rope_index (B=8);
# issue 5: the CUDA C++ kernels at least as fast as the Triton ones at S=16384
# --------------------------------------------------------------------------------------

# The rope suite's ops (benchmarks/bench_rope.py): the targets set for every op of the
# rotary family hold for each (issue 11's host budget), issue 5's for each the CUDA C++
# kernels take
ROPE_OPS = ("mrope", "mrope_interleaved", "mrope_partial", "mrope_pairs", "vision_rope")
# Issue 5 compares the two kernels where both run: the CUDA C++ kernels rotate halves only,
# so GLM-4V's paired lanes (mrope_pairs) have no CUDA C++ time to compare (its CUDA C++
# providers are unavailable, bench_rope.CUDA_MISSING)
ROPE_CUDA_OPS = tuple(op for op in ROPE_OPS if op != "mrope_pairs")
ROPE_KERNEL_PROVIDERS = (
    "vlmkernels",
    "vlmkernels_positions",
    "vlmkernels_cuda",
    "vlmkernels_cuda_positions",
)
ROPE_BANDWIDTH = tuple(
    Target(suite="rope", op="mrope", provider=p, mode="fwd", shape=_shape(B=1, S=s),
           metric="pct_copy_ceiling", relation=GE, bound=90, issue=4)
    for s in (16384, 65536)
    for p in ROPE_KERNEL_PROVIDERS
)  # fmt: skip
ROPE_SPEED = tuple(
    Target(suite="rope", op="mrope", provider=p, mode="fwd+bwd", shape=_shape(B=1, S=s),
           metric="ms", relation=LE, bound=1 / 3, bound_text="1/3", baseline="compile",
           issue=4)
    for s in (1024, 4096, 16384, 65536)
    for p in ROPE_KERNEL_PROVIDERS
)  # fmt: skip
ROPE_BACKENDS = tuple(
    Target(suite="rope", op=op, provider=cuda_p, mode=mode, shape=_shape(B=1, S=16384),
           metric="ms", relation=LE, bound=1, baseline=triton_p, issue=5)
    for op in ROPE_CUDA_OPS
    for triton_p, cuda_p in (("vlmkernels", "vlmkernels_cuda"),
                             ("vlmkernels_positions", "vlmkernels_cuda_positions"))
    for mode in ("fwd", "bwd", "fwd+bwd")
)  # fmt: skip
ROPE_INDEX = tuple(
    Target(suite="rope_index", op=f"get_rope_index_{m}", provider="transformers",
           baseline="vlmkernels", mode="fwd", shape=_shape(B=8), metric="ms", relation=GE,
           bound=50, dtype=None, issue=4)
    for m in ("qwen2_vl", "qwen3_vl")
)  # fmt: skip

# --------------------------------------------------------------------------------------
# Issue 11: eager host time per call, Triton's launcher excluded (benchmarks/host.py):
# 25 us for the rotary family's forward, 60 us for a loss's forward+backward
# --------------------------------------------------------------------------------------

HOST = tuple(
    Target(suite="rope", op=op, provider=p, mode="fwd", metric="host_us", relation=LE,
           bound=25, beside="eager", dtype="float32", issue=11)
    for op in ROPE_OPS
    for p in ("vlmkernels", "vlmkernels_positions")
) + tuple(
    Target(suite="contrastive", op=op, provider="vlmkernels", mode="fwd+bwd",
           metric="host_us", relation=LE, bound=60, beside="eager", dtype="float32",
           issue=11)
    for op in ("clip_loss", "siglip_loss")
) + tuple(
    Target(suite="contrastive_dist", op=op, provider="vlmkernels", mode="fwd+bwd",
           metric="host_us", relation=LE, bound=60, beside="eager", dtype="float32",
           issue=11)
    for op in ("albef_itc", "albef_itc_distill", "blip_itc_ids")  # contrastive_cross_entropy
)  # fmt: skip

TARGETS: tuple[Target, ...] = (
    CONTRASTIVE + ROPE_BANDWIDTH + ROPE_SPEED + ROPE_BACKENDS + ROPE_INDEX + HOST
)

# --------------------------------------------------------------------------------------
# Issue 13: ToMe's matching + merge at least 5x faster than eager ToMe (H100, batch 256,
# 576 tokens, 1024 channels, r 16, bf16, forward)
# --------------------------------------------------------------------------------------

TOKENS = (
    Target(suite="tokens", op="tome_merge", provider="vlmkernels", mode="fwd",
           shape=_shape(B=256, N=576, C=1024, r=16), metric="ms", relation=LE, bound=0.2,
           bound_text="1/5", baseline="eager", issue=13),
)  # fmt: skip
TARGETS += TOKENS


def for_suite(suite: str, metric: str | None = None, **match) -> list[Target]:
    """The targets of ``suite`` (of ``metric``, and whose fields equal ``match``), in the
    order above."""
    return [
        t
        for t in TARGETS
        if t.suite == suite
        and (metric is None or t.metric == metric)
        and all(getattr(t, k) == v for k, v in match.items())
    ]


def issues(targets) -> str:
    """ "issue 3" or "issues 4, 5": the issues that set ``targets``."""
    numbers = sorted({t.issue for t in targets})
    return ("issue " if len(numbers) == 1 else "issues ") + ", ".join(map(str, numbers))


def shape_text(shape: Mapping[str, int] | tuple) -> str:
    return ", ".join(f"{k}={v}" for k, v in dict(shape).items())


def summary(suite: str, results: Results, on_cuda: bool, cpu_note: str,
            heading: str = "") -> list[str]:  # fmt: skip
    """A suite's summary lines: each of its targets as measured in this run (value, HIT or
    MISS, or why it was not measured), and ``cpu_note`` where the run had no CUDA device."""
    found = for_suite(suite)
    lines = [f"Targets ({issues(found)}{heading}):"]
    for t in found:
        v = t.evaluate(results)
        ratio = f" / {t.baseline} {t.metric}" if t.baseline else ""
        label = f"  {t.op} {t.mode} {t.provider} {t.metric}{ratio} ({shape_text(t.shape)})"
        if not v.measured:
            lines.append(f"{label}: target {t.text}: not measured ({v.reason})")
        else:
            lines.append(f"{label}: {v.value:.3g}, target {t.text}: {'HIT' if v.hit else 'MISS'}")
    if not on_cuda:
        lines.append(f"  ({cpu_note})")
    return lines


def summarizer(suite: str, cpu_note: str, heading: str = ""):
    """A suite's ``summarize(results, cfg)``: the :func:`summary` of its targets, with
    ``cpu_note`` where the run had no CUDA device."""

    def summarize(results: Results, cfg) -> list[str]:
        """The targets of this suite as measured in this run."""
        return summary(suite, results, cfg.device.type == "cuda", cpu_note, heading)

    return summarize


# --------------------------------------------------------------------------------------
# Issue 12: attention (H100, bf16, forward). Few-query cross-attention (H 16, D 64) at least
# 2x cuDNN SDPA when B x H <= 32 and at least 0.95x elsewhere; the key mass in at most 1.15x
# of the same attention without it; Flamingo's media-masked attention <= 30 us at B 8,
# T 2048, H 8, D 64, 5 media of 64 latents
# --------------------------------------------------------------------------------------

ATTENTION = tuple(
    Target(suite="attention", op="cross_attention", provider="vlmkernels", mode="fwd",
           shape=_shape(B=b, H=16, Lq=lq, Lk=lk, D=64), metric="ms", relation=LE,
           bound=0.5 if b * 16 <= 32 else 1 / 0.95,
           bound_text="1/2" if b * 16 <= 32 else "1/0.95", baseline="sdpa_cudnn", issue=12)
    for b in (1, 8, 64)
    for lq in (32, 64)
    for lk in (1024, 4096)
) + tuple(
    Target(suite="attention", op="attention_key_mass", provider="vlmkernels", mode="fwd",
           shape=_shape(B=b, H=16, Lq=32, Lk=4096, D=64), metric="ms", relation=LE,
           bound=1.15, baseline="vlmkernels_plain", issue=12)
    for b in (1, 64)
) + (
    Target(suite="attention_media", op="media_cross_attention", provider="vlmkernels",
           mode="fwd", shape=_shape(B=8, T=2048, H=8, D=64, M=5, L=64), metric="ms",
           relation=LE, bound=0.030, issue=12),
)  # fmt: skip

TARGETS += ATTENTION

# BLIP-2's Q-Former (12 layers, 32 queries, 257 x 1408 image features), H100 bf16: forward
# <= 1 ms at batch 1 and <= 3.5 ms at batch 256; the fp32 mode within 1.5x of bf16;
# forward+backward <= 1/3 of transformers' bf16. (The error bound, <= 1e-3 relative to the
# fp32 reference in bf16, is a test, not a timing.)
_BLIP2 = dict(L=12, Hd=768, Lq=32, N=257, E=1408)
QFORMER = tuple(
    Target(suite="attention_qformer", op="qformer", provider="vlmkernels", mode="fwd",
           shape=_shape(B=b, **_BLIP2), metric="ms", relation=LE, bound=bound, issue=12)
    for b, bound in ((1, 1.0), (256, 3.5))
) + tuple(
    Target(suite="attention_qformer", op="qformer", provider="vlmkernels_fp32", mode="fwd",
           shape=_shape(B=b, **_BLIP2), metric="ms", relation=LE, bound=1.5,
           baseline="vlmkernels", issue=12)
    for b in (1, 256)
) + tuple(
    Target(suite="attention_qformer", op="qformer", provider="vlmkernels", mode="fwd+bwd",
           shape=_shape(B=b, **_BLIP2), metric="ms", relation=LE, bound=1 / 3,
           bound_text="1/3", baseline="transformers", issue=12)
    for b in (1, 256)
)  # fmt: skip

TARGETS += QFORMER

# --------------------------------------------------------------------------------------
# Issue 13: connectors (H100, bf16). Idefics3's connector (32 images of 32 x 32 x 1152 ->
# 4096) <= 0.45 ms forward; the LLaVA projector forward at least as fast as eager cuBLAS;
# the Qwen2.5-VL merger (4 images of 1024 x 1024, 1280 -> 3584) forward+backward <= 0.7x
# torch.compile. The suite's shapes carry every op's keys (benchmarks/bench_connectors.py).
# --------------------------------------------------------------------------------------

CONNECTOR_SHAPE = _shape(M=4608, K=1024, N=4096, B=32, S=32, C=1152, P=21904, QC=1280,
                         QN=3584, L=4096, D=4096, IB=64, IC=1024, IN=4096, GB=8, GS=64, GK=4,
                         GC=1152, GN=2560, AB=8, AS=32, AC=1152, AI=18432,
                         AN=8192)  # fmt: skip
CONNECTORS = (
    Target(suite="connectors", op="idefics3_connector", provider="vlmkernels", mode="fwd",
           shape=CONNECTOR_SHAPE, metric="ms", relation=LE, bound=0.45, issue=13),
    Target(suite="connectors", op="llava_projector", provider="vlmkernels", mode="fwd",
           shape=CONNECTOR_SHAPE, metric="ms", relation=LE, bound=1.0, baseline="eager",
           issue=13),
    Target(suite="connectors", op="qwen_merger", provider="vlmkernels", mode="fwd+bwd",
           shape=CONNECTOR_SHAPE, metric="ms", relation=LE, bound=0.7, baseline="compile",
           issue=13),
    # InternVL's connector (64 images of 32 x 32 x 1024 -> 4096) <= 0.8x torch.compile
    Target(suite="connectors", op="internvl_connector", provider="vlmkernels", mode="fwd",
           shape=CONNECTOR_SHAPE, metric="ms", relation=LE, bound=0.8, baseline="compile",
           issue=13),
)  # fmt: skip
# The LLaVA projector's saved activations in a training step <= 0.6x eager's (saved_mb: the
# bytes autograd keeps after the forward, inputs and parameters excluded). A size, not a
# time: the CPU run judges it at the CPU sweep's shape (bench_connectors.grid("cpu")) in
# float32, a GPU run at the model's shape in bf16.
CONNECTOR_CPU_SHAPE = _shape(M=64, K=64, N=128, B=2, S=8, C=32, P=256, QC=32, QN=64, L=64,
                             D=64, IB=2, IC=16, IN=48, GB=2, GS=8, GK=4, GC=32,
                             GN=48, AB=2, AS=8, AC=16, AI=48, AN=40)  # fmt: skip
CONNECTORS += tuple(
    Target(suite="connectors", op="llava_projector", provider="vlmkernels", mode="fwd+bwd",
           shape=shape, metric="saved_mb", relation=LE, bound=0.6, baseline="eager",
           dtype=dtype, issue=13)
    for shape, dtype in ((CONNECTOR_SHAPE, BF16), (CONNECTOR_CPU_SHAPE, "float32"))
)  # fmt: skip
TARGETS += CONNECTORS
