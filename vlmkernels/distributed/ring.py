"""Ring-parallel CLIP and SigLIP losses over a torch.distributed process group.

The global batch is the concatenation of the ranks' local batches in rank order: rank p
holds the image features X_p and text features Y_p of the b_p global rows from start_p on
(local batch sizes may differ between ranks). The global logits S = s X Y^T + b split
into n x n blocks S_pj = s X_p Y_j^T + b; rank p computes block row p, one block per step,
with the block primitives of :mod:`vlmkernels.ops.contrastive` (Triton kernels on CUDA or
under the interpreter, chunked PyTorch otherwise). Positives are the global diagonal, i.e.
column = row + (start_p - start_j) inside block (p, j), or equal ids.

Ring schedule. Rank p sends to p + 1 and receives from p - 1 (mod n); at step
k = 0 .. n - 1 it holds text block j = p - k (its own at step 0). At the start of a step
it posts the transfer of the block it holds to p + 1 (and the receipt of block j - 1 from
p - 1) with ``batch_isend_irecv``, computes its block, and waits for the transfer only at
the start of the next step: communication overlaps the kernel. The accumulators that
travel with a block (CLIP column statistics, dY) change during the step, so each is posted
right after the step's kernel and waited for after the next step's kernel: that transfer
overlaps compute too. After n steps each accumulator has visited every rank and makes one
last hop home.

- CLIP forward (one rotation, both directions): rank p merges the row statistics of X_p
  over every Y_j locally; the column statistics of Y_j (log-sum-exp, sum of S over
  positives, positive count, sum of S with label smoothing) accumulate as Y_j travels and
  arrive home complete. Losses follow from the statistics; saved for backward: the inputs
  and (lse, count) of the own rows and columns, O(b).
- CLIP backward (second rotation): Y_j travels with its column coefficients (6, b_j) and
  ids; rank p adds the block's dX into an fp32 dX_p and its dY into a fresh fp32 buffer,
  which is added to the dY_j accumulator arriving from p - 1 and sent on; it arrives home
  after n hops. Scale and bias gradients: local sums, one all-reduce.
- SigLIP needs no statistics. A scalar loss that needs gradients takes one rotation
  computing loss, dX, dY (travelling accumulator), dscale and dbias at once; backward only
  scales them by the upstream gradient. Without gradients (or with ``reduction="none"``) the
  forward rotation computes the row losses only and, for "none", backward runs a gradient
  rotation with the upstream per-row weights.

Communication per rank, with e the features' element size and n ranks:
- CLIP forward: (n - 1) Y blocks (b d e bytes each) and n column-statistics blocks
  (3 or 4 fp32 per column), plus ids (8 bytes per row) when given;
- CLIP backward: (n - 1) Y blocks with their coefficients (6 fp32 per column) and n fp32
  dY blocks (4 b d bytes each);
- SigLIP: (n - 1) Y blocks and, when gradients are computed, n fp32 dY blocks;
- once per call: an all-gather of a few numbers per rank (sizes and consistency checks,
  including the logit scale and bias values: :mod:`vlmkernels.distributed.consistency`;
  one host synchronisation), and one all-reduce of two or three scalars (loss sum, dscale,
  dbias). A single-rank group communicates nothing at all.

Memory per rank beyond the inputs: two Y blocks (the one computed on and the one in
flight), the column statistics and coefficients (O(b)), and in gradient rotations an fp32
dX and three fp32 dY blocks (the step's contribution, the one received, the one in flight),
plus the block primitives' own chunk buffer (chunk x b_j); the fused SigLIP path keeps dX_p
and dY_p (input dtype) from forward to backward. Never anything of size global batch x d,
nor N x N or b x N logits.

Gradients. Every rank must run backward (it is collective). x and y receive this rank's
slice of the gradient of the global loss, as the single-process loss on the concatenated
batch gives; scale and bias receive the full gradient of the global loss on every rank.
Under DDP (gradients averaged over the n ranks) the encoders therefore get 1/n of the
single-process gradient and the scale / bias the full one: see :func:`clip_loss_ring` for
what to do about the learnable scale. Second-order gradients are not implemented: after a
backward with ``create_graph=True`` (which works), differentiating the gradients raises
NotImplementedError on every rank, before any communication.

Errors. The group and arguments are checked before anything travels, and a rank whose own
checks fail (its arguments, its features' device, a forced backend or CLIP backward design
that cannot run there) tells the others in the consistency exchange: every rank raises. An
error raised inside a rotation on every rank alike (out of memory at the same step, as
equal shards give) waits for the transfers already posted before it propagates, so the
group stays usable (a retry with a smaller batch works); one rank failing alone in a
rotation leaves the others waiting in its transfers, as any collective does.

Not traced by torch.compile: the functions are wrapped in ``torch.compiler.disable`` (a
compiled caller graph-breaks around them and runs them eagerly; ``fullgraph=True`` fails
with dynamo's error naming them), and raise if they run while this thread traces
(:func:`vlmkernels.core.runtime.tracing`, e.g. under export).
"""

from __future__ import annotations

import dataclasses
import functools
import sys

import torch
import torch.distributed as dist

from ..core.backend import in_forward_backend, remember_backend, resolve_backend
from ..core.checks import FLOAT_DTYPES, REDUCTIONS
from ..core.op import first_order_only, without_autocast
from ..core.runtime import tracing
from ..ops.contrastive import (
    FAMILY,
    SideStats,
    Targets,
    block_grads,
    block_stats,
    clip_backward_design,
    forward_grad_dtype,
    siglip_block_grads,
    siglip_block_rows,
)
from .consistency import check_agree, exchange

__all__ = ["clip_loss_ring", "report_local_error", "siglip_loss_ring"]

_KINDS = ("clip_loss", "siglip_loss")
# Tags keep the tensors of one step apart on backends that match messages by tag (gloo).
_TAG_Y, _TAG_IDS, _TAG_COEF, _TAG_ACC = 0, 1, 2, 3


def _not_traced(fn):
    """``torch.compiler.disable(fn)``, made at the first call once torch._dynamo is loaded:
    ``disable`` imports torch._dynamo, which neither ``import vlmkernels`` nor an eager call
    may do (it replaces torch.manual_seed); while it is not loaded nothing can be tracing.
    A compiled caller still graph-breaks around ``fn`` and runs it eagerly, and
    ``fullgraph=True`` fails with dynamo's error naming it."""
    disabled = None

    @functools.wraps(fn)
    def run(*args, **kwargs):
        nonlocal disabled
        if disabled is None:
            if "torch._dynamo" not in sys.modules:  # nothing can be tracing this call
                return fn(*args, **kwargs)
            disabled = torch.compiler.disable(fn, reason=_NOT_TRACED)
        return disabled(*args, **kwargs)

    return run


_NOT_TRACED = "vlmkernels' ring mode communicates inside its autograd.Function: it runs eagerly"


# --------------------------------------------------------------------------------------
# The group and the consistency checks
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Ring:
    """This rank's view of the ring: its place, every rank's local batch size."""

    group: dist.ProcessGroup
    rank: int
    world: int
    sizes: tuple[int, ...]

    @property
    def total(self) -> int:
        return sum(self.sizes)

    def start(self, r: int) -> int:
        return sum(self.sizes[:r])

    def block(self, step: int) -> int:
        """The text block this rank holds at ``step``."""
        return (self.rank - step) % self.world

    def offset(self, j: int) -> int:
        """Targets offset of block (this rank, j): column = row + offset on the diagonal."""
        return self.start(self.rank) - self.start(j)


def _check_group(op: str, group) -> tuple[int, int]:
    """(rank, world size) of this process in ``group``; raises if it is not usable."""
    if not dist.is_available():
        raise RuntimeError(f"{op}: torch.distributed is not available in this build of torch")
    if not dist.is_initialized():
        raise RuntimeError(
            f"{op}: a process_group was given but torch.distributed is not initialised "
            "(call torch.distributed.init_process_group first)"
        )
    if group is dist.GroupMember.NON_GROUP_MEMBER:  # what new_group gives the others
        raise ValueError(f"{op}: this process is not a member of process_group")
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(
            f"{op}: process_group must be a torch.distributed.ProcessGroup, "
            f"got {type(group).__name__}"
        )
    try:
        rank, world = dist.get_rank(group), dist.get_world_size(group)
    except (RuntimeError, ValueError) as e:
        raise RuntimeError(f"{op}: process_group is not usable (destroyed?): {e}") from e
    if rank < 0:
        raise ValueError(f"{op}: this process is not a member of process_group")
    return rank, world


def _group_device(group, x: torch.Tensor) -> torch.device:
    """Where the group's collectives take tensors: the CPU for gloo, the current CUDA
    device for NCCL, whatever the features' device (the consistency exchange reports a
    rank whose features are elsewhere), else the features'."""
    backend = str(dist.get_backend(group))
    if backend == "gloo":
        return torch.device("cpu")
    if backend == "nccl":
        return x.device if x.is_cuda else torch.device("cuda", torch.cuda.current_device())
    return x.device


def _check_local(op: str, group, x: torch.Tensor) -> None:
    """This rank's checks that need no other rank: features on the group's device, and the
    configuration the block primitives read (a forced backend that cannot run here, an
    unknown ``VLMKERNELS_CLIP_BACKWARD``), resolved now rather than inside a rotation,
    where other ranks would be waiting on this one."""
    backend = str(dist.get_backend(group))
    if backend == "gloo" and x.is_cuda:
        raise NotImplementedError(
            f"{op}: CUDA features need an NCCL process group (this one is gloo)"
        )
    if backend == "nccl" and not x.is_cuda:
        raise ValueError(f"{op}: the process group is NCCL but the features are on {x.device}")
    if resolve_backend(FAMILY.name, x) == "triton" and op == "clip_loss":
        clip_backward_design(None, x.device)


# What every rank sends once per call: an error flag (report_local_error), its local batch
# size and what must agree. The scale and bias go as values (0-d tensors, no host sync).
_META = ("error", "batch", "dim", "dtype", "kind", "ids", "bias", "reduction", "smoothing",
         "grad", "scale", "bias_value")  # fmt: skip


def _exchange_meta(group, x, values: dict) -> list[dict]:
    """Every rank's ``_META`` values (:func:`consistency.exchange`), in rank order."""
    assert tuple(values) == _META
    return exchange(group, _group_device(group, x), values)


def _yes_no(v) -> str:
    return "yes" if v else "no"


# field: (what the ranks disagree on, how a value reads)
_DESCRIBE = {
    "kind": ("the loss", lambda v: _KINDS[int(v)]),
    "dim": ("the feature dim", lambda v: str(int(v))),
    "dtype": ("the feature dtype", lambda v: str(FLOAT_DTYPES[int(v)]).removeprefix("torch.")),
    "ids": ("whether ids are given", _yes_no),
    "bias": ("whether logit_bias is given", _yes_no),
    "reduction": ("the reduction", lambda v: REDUCTIONS[int(v)]),
    "smoothing": ("label_smoothing", str),
    "grad": ("whether gradients are needed (grad mode and requires_grad)", _yes_no),
    "scale": ("logit_scale", repr),
    "bias_value": ("logit_bias", repr),
}


# the "error" field: a rank's argument checks failed (:func:`report_local_error`: its other
# fields are meaningless), or its local configuration did (:func:`_check_local`: they hold)
_REJECTED, _MISCONFIGURED = 1.0, 2.0


def _check_consistent(op: str, table: list[dict], local_error: Exception | None = None) -> None:
    """Raises the same error on every rank where a rank failed its argument checks
    (:func:`report_local_error`) or a field differs between ranks; then, where a rank's
    local configuration failed, that rank raises its own error (``local_error``) and the
    others say which rank it was."""

    def rejected(value):
        failed = [r for r, row in enumerate(table) if row["error"] == value]
        if failed:
            raise ValueError(
                f"{op}: rank(s) {failed} of the process group rejected their arguments (see "
                "the error raised there); no rank runs the ring"
            )

    rejected(_REJECTED)
    check_agree(op, table, _DESCRIBE)
    if local_error is not None:
        raise local_error
    rejected(_MISCONFIGURED)


def _setup(op, group, x, scale, bias, *, reduction, grad, ids=False, smoothing=0.0) -> _Ring:
    """Checks the group and the other ranks' arguments (``scale`` and ``bias``: the 0-d
    tensors, or None for no bias); every rank raises the same error."""
    if tracing():
        raise RuntimeError(
            f"{op}: the process_group (ring) mode cannot be traced by torch.compile or "
            "export; call it outside the compiled region"
        )
    rank, world = _check_group(op, group)
    if world == 1:  # nothing to agree on, nothing to send: no collective, no host sync
        _check_local(op, group, x)
        return _Ring(group, rank, world, (x.shape[0],))
    local_error = None
    try:
        _check_local(op, group, x)
    except (ValueError, TypeError, RuntimeError, NotImplementedError) as error:
        local_error = error
    values = dict(error=_MISCONFIGURED if local_error else 0.0, batch=x.shape[0],
                  dim=x.shape[1], dtype=FLOAT_DTYPES.index(x.dtype),
                  kind=_KINDS.index(op), ids=ids, bias=bias is not None,
                  reduction=REDUCTIONS.index(reduction), smoothing=smoothing, grad=grad,
                  scale=scale, bias_value=bias if bias is not None else 0.0)  # fmt: skip
    table = _exchange_meta(group, x, values)
    _check_consistent(op, table, local_error)
    return _Ring(group, rank, world, tuple(int(row["batch"]) for row in table))


def report_local_error(op: str, group, features, error: Exception) -> None:
    """Raises ``error`` here after telling the other ranks, which are waiting in the
    consistency exchange of :func:`_setup`, so that they raise too instead of hanging.

    Called by the process-group entry points (:mod:`.contrastive`) when this rank's own
    arguments fail their checks."""
    try:
        rank, world = _check_group(op, group)
        if world > 1:
            like = features if isinstance(features, torch.Tensor) else torch.empty(0)
            _exchange_meta(group, like, {key: _REJECTED * (key == "error") for key in _META})
    except Exception:  # noqa: BLE001 - the local error is the one to report
        pass
    raise error


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


# --------------------------------------------------------------------------------------
# Point-to-point transfers around the ring
# --------------------------------------------------------------------------------------


class _Transfer:
    """Tensors sent to the next rank and buffers receiving from the previous one."""

    def __init__(self, ring: _Ring, sends: list, recv_specs: list, tags: list[int]):
        self.received = [torch.empty(shape, dtype=dtype, device=device)
                         for shape, dtype, device in recv_specs]  # fmt: skip
        self._sent = [t.contiguous() for t in sends]
        nxt, prev = (ring.rank + 1) % ring.world, (ring.rank - 1) % ring.world
        ops = []
        for s, r, tag in zip(self._sent, self.received, tags, strict=True):
            ops.append(dist.P2POp(dist.isend, s, group=ring.group, group_peer=nxt, tag=tag))
            ops.append(dist.P2POp(dist.irecv, r, group=ring.group, group_peer=prev, tag=tag))
        self._works = dist.batch_isend_irecv(ops)
        self.done = False

    def wait(self) -> list[torch.Tensor]:
        for work in self._works:
            work.wait()
        self._sent, self.done = None, True
        return self.received

    def drain(self) -> None:
        """Waits for the transfer without using it (its errors ignored)."""
        for work in self._works:
            try:
                work.wait()
            except Exception:  # noqa: BLE001, S110 - the rotation's own error is raised
                pass
        self._sent = self.received = None
        self.done = True


class _InFlight:
    """A rotation's posted transfers not yet waited for (``inflight(transfer)`` registers
    one). When the rotation raises (out of memory, a kernel error: the same on every rank),
    they are waited for before the error propagates, so that no send or receive is left
    posted to match the messages of the group's next call (which would then hang)."""

    def __init__(self):
        self._posted: list[_Transfer] = []

    def __call__(self, transfer: _Transfer) -> _Transfer:
        self._posted = [t for t in self._posted if not t.done]
        self._posted.append(transfer)
        return transfer

    def __enter__(self) -> _InFlight:
        return self

    def __exit__(self, kind, *_) -> None:
        if kind is not None:
            for transfer in self._posted:
                if not transfer.done:
                    transfer.drain()
        self._posted = []


def _pass_block(ring: _Ring, step: int, tensors: list, tags: list[int], shapes) -> _Transfer:
    """Posts the transfer of this step's block (``tensors``) for the next step; ``shapes``
    maps the incoming block's size to the shapes of the received tensors."""
    rows = ring.sizes[ring.block(step + 1)]
    specs = [(shape, t.dtype, t.device) for t, shape in zip(tensors, shapes(rows), strict=True)]
    return _Transfer(ring, tensors, specs, tags)


def _ring_blocks(ring: _Ring, block: list, tags: list[int], shapes, inflight: _InFlight):
    """(step, j, block j) for the steps of a rotation: the text block this rank holds at
    each step (its own first), the transfer of the next one posted before the step's work
    (registered with ``inflight``)."""
    incoming = None
    for step in range(ring.world):
        if incoming is not None:
            block = incoming.wait()
        if step < ring.world - 1:
            incoming = inflight(_pass_block(ring, step, block, tags, shapes))
        yield step, ring.block(step), block


# --------------------------------------------------------------------------------------
# CLIP
# --------------------------------------------------------------------------------------


def _stats_fields(smoothing: float) -> tuple[str, ...]:
    return ("lse", "hard_dot", "hard_cnt") + (("logit_sum",) if smoothing else ())


def _pack(stats: SideStats, fields) -> torch.Tensor:
    return torch.stack([getattr(stats, f) for f in fields])


def _unpack(packed: torch.Tensor, fields) -> SideStats:
    return SideStats(**dict(zip(fields, packed.unbind(0), strict=True)))


def _block_targets(ring: _Ring, j: int, ids, ids_j, smoothing: float) -> Targets:
    if ids is not None:
        return Targets(row_ids=ids, col_ids=ids_j, smoothing=smoothing)
    return Targets(offset=ring.offset(j), smoothing=smoothing)


def _y_block(y, ids):
    """The tensors travelling as a text block, their tags and their shapes per size."""
    tensors, tags = [y], [_TAG_Y]
    if ids is not None:
        tensors.append(ids)
        tags.append(_TAG_IDS)
    d = y.shape[1]
    return tensors, tags, lambda b: [(b, d), (b,)][: len(tensors)]


def _clip_stats_rotation(ring, x, y, scale, bias, ids, smoothing, chunk):
    """(row stats of X_p over all columns, column stats of Y_p over all rows)."""
    fields = _stats_fields(smoothing)
    n = ring.world
    own, tags, shapes = _y_block(y, ids)
    rows = stats_in = None
    with _InFlight() as inflight:
        for step, j, block in _ring_blocks(ring, own, tags, shapes, inflight):
            ids_j = block[1] if ids is not None else None
            targets = _block_targets(ring, j, ids, ids_j, smoothing)
            r, c = block_stats(x, block[0], scale, bias, targets, True, True, chunk)
            rows = r if rows is None else rows.merge(r)
            if stats_in is not None:
                c = _unpack(stats_in.wait()[0], fields).merge(c)
            if n == 1:
                return rows, c
            packed = _pack(c, fields)
            spec = ((len(fields), ring.sizes[ring.block(step + 1)]), packed.dtype, packed.device)
            stats_in = inflight(_Transfer(ring, [packed], [spec], [_TAG_ACC]))
        return rows, _unpack(stats_in.wait()[0], fields)


def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _grad_rotation(ring, x, y, extra, tags, compute):
    """Shared gradient rotation: Y (with ``extra`` per-block tensors whose last dim is the
    block's rows) travels; ``compute(j, y_j, extras_j, dx, dy_part)`` adds block (p, j)'s
    gradients into the fp32 dX and dY_part and returns its (dscale, dbias) shares.
    Returns (dX_p, dY_p, dscale, dbias), dscale / dbias this rank's shares only."""
    n, d = ring.world, x.shape[1]
    acc = dict(dtype=_acc_dtype(x), device=x.device)
    dx = torch.zeros(x.shape, **acc)
    shapes = lambda b: [(b, d)] + [(*t.shape[:-1], b) for t in extra]  # noqa: E731
    ds = db = 0.0
    dy_in = None
    with _InFlight() as inflight:
        blocks = _ring_blocks(ring, [y, *extra], [_TAG_Y, *tags], shapes, inflight)
        for step, j, block in blocks:
            dy = torch.zeros((ring.sizes[j], d), **acc)
            s, b = compute(j, block[0], block[1:], dx, dy)
            ds, db = ds + s, db + b
            if dy_in is not None:
                dy.add_(dy_in.wait()[0])
            if n == 1:
                return dx, dy, ds, db
            b_prev = ring.sizes[ring.block(step + 1)]
            spec = ((b_prev, d), dy.dtype, dy.device)
            dy_in = inflight(_Transfer(ring, [dy], [spec], [_TAG_ACC]))
        return dx, dy_in.wait()[0], ds, db


def _all_reduce(ring: _Ring, *values: torch.Tensor) -> list[torch.Tensor]:
    """Sums over the ranks of 0-d tensors (on the features' device), in one all-reduce, as
    views of one tensor: a loss returned from an autograd Function is copied out of it
    (autograd refuses in-place changes of a view made inside a Function)."""
    packed = torch.stack([v.reshape(()).to(torch.float64) for v in values])
    if ring.world > 1:
        dist.all_reduce(packed, group=ring.group)
    return list(packed.unbind(0))


def _reduction_weight(reduction: str, n_total: int, clip: bool) -> float:
    if reduction == "mean":
        return 1.0 / (2 * n_total) if clip else 1.0 / n_total
    return 0.5 if clip else 1.0


def _param_grads(ctx, dx, dy, ds, db, x, y, scale, bias):
    """One gradient per input of the Function: those of x, y, scale and bias (its first
    four inputs) where autograd asked for them, in their dtypes; None for the rest."""
    need = ctx.needs_input_grad
    return (
        dx.to(x.dtype) if need[0] else None,
        dy.to(y.dtype) if need[1] else None,
        ds.to(scale.dtype).reshape(scale.shape) if need[2] else None,
        db.to(bias.dtype).reshape(bias.shape) if bias is not None and need[3] else None,
        *(None,) * (len(need) - 4),
    )


class _ClipRing(torch.autograd.Function):
    @staticmethod
    @without_autocast
    def forward(ctx, x, y, scale, bias, ids, ring, reduction, smoothing, chunk):
        remember_backend(ctx)
        rows, cols = _clip_stats_rotation(ring, x, y, scale, bias, ids, smoothing, chunk)
        targets = Targets(smoothing=smoothing)
        losses = torch.stack((rows.losses(targets, ring.total), cols.losses(targets, ring.total)))
        ctx.save_for_backward(x, y, scale, bias, ids, torch.stack((rows.lse, rows.hard_cnt)),
                              torch.stack((cols.lse, cols.hard_cnt)))  # fmt: skip
        ctx.ring, ctx.reduction, ctx.smoothing, ctx.chunk = ring, reduction, smoothing, chunk
        if reduction == "none":
            return losses
        weight = _reduction_weight(reduction, ring.total, clip=True)
        (total,) = _all_reduce(ring, losses.sum() * weight)
        return total.to(losses.dtype, copy=True)  # not a view of the reduced pack

    @staticmethod
    @first_order_only("clip_loss")
    @in_forward_backend
    @without_autocast
    def backward(ctx, grad):
        x, y, scale, bias, ids, row_state, col_state = ctx.saved_tensors
        ring, smoothing = ctx.ring, ctx.smoothing
        if ctx.reduction == "none":
            u, v = grad[0], grad[1]
        else:
            g = grad * _reduction_weight(ctx.reduction, ring.total, clip=True)
            u = v = g.expand(x.shape[0])
        targets = Targets(smoothing=smoothing)

        def coef(state, w):
            side = SideStats(state[0], state[0], state[1])
            return side.coefficients(targets, ring.total, w.to(state.dtype), None).contiguous()

        row_coef = coef(row_state, u)
        extra = [coef(col_state, v)] + ([ids] if ids is not None else [])

        def compute(j, y_j, extras, dx, dy):
            t = _block_targets(ring, j, ids, extras[1] if ids is not None else None, smoothing)
            _, _, s, b = block_grads(x, y_j, scale, bias, t, row_coef, extras[0], ctx.chunk,
                                     dx_acc=dx, dy_acc=dy)  # fmt: skip
            return s, b

        tags = [_TAG_COEF] + ([_TAG_IDS] if ids is not None else [])
        dx, dy, ds, db = _grad_rotation(ring, x, y, extra, tags, compute)
        ds, db = _all_reduce(ring, ds, db)
        return _param_grads(ctx, dx, dy, ds, db, x, y, scale, bias)


@_not_traced
def clip_loss_ring(x, y, scale, bias, group, chunk_size, reduction, *, ids=None,
                   label_smoothing=0.0):  # fmt: skip
    r"""CLIP loss of the global batch from this rank's shard, on a ring of ``group``.

    Called by ``vlmkernels.clip_loss(..., process_group=group)``
    (:func:`vlmkernels.distributed.contrastive.clip_loss`), which has checked the local
    arguments.

    Args:
        x, y: (b_r, d) image and text features of this rank; the global batch is the
            concatenation over the group's ranks in rank order. b_r may differ between
            ranks; d and the dtype may not.
        scale, bias: 0-d tensors (bias may be None); gradients flow to them.
        group: an initialised ``torch.distributed.ProcessGroup`` (gloo for CPU tensors,
            NCCL for CUDA tensors).
        chunk_size: rows of logit gradient per chunk in the block primitives (0: default).
        reduction: ``"mean"`` / ``"sum"``: the global loss, the same on every rank;
            ``"none"``: the (2, b_r) per-sample [image-to-text; text-to-image] losses of this
            rank's samples.
        ids: (b_r,) int64 or None: pairs with equal ids are positives (they travel with the
            text blocks, so positives may be on different ranks). All ranks or none.
        label_smoothing: eps, with the global batch size as the class count.

    Gradients (every rank must run backward: it is a collective). With upstream gradient
    g_r on rank r, backward differentiates sum_r g_r L_r, L_r rank r's share of the loss
    (for "mean"/"sum": its samples' part of the global sum, so with the same g on every
    rank, as ``loss.backward()`` everywhere gives, this is g times the global loss):
    x and y receive this rank's slice of the gradient of the global loss, exactly as the
    single-process loss on the concatenated batch would give them; scale and bias receive
    the full gradient of the global loss on every rank (all-reduced).

    Under DDP, which averages parameter gradients over the n ranks: the encoders receive
    (1/n) times the single-process gradient (each rank contributes its own slice once, and
    DDP divides by n), while ``logit_scale`` / ``logit_bias`` receive the same full gradient
    on every rank, which averaging leaves unchanged, i.e. n times too much relative to the
    encoders. To train exactly as the single-process loss on the global batch: backward
    ``loss * world_size`` (encoders then get the exact gradient) and divide the scale's and
    bias's gradients by world_size before DDP reduces them, e.g.
    ``model.logit_scale.register_hook(lambda g: g / world_size)``. (With Adam-type
    optimisers the overall factor does not matter, only the mismatch between scale and
    encoders.)

    Local batch sizes are exchanged once per call (an all-gather of a few numbers with the
    consistency checks: feature dim, dtype, ids, bias, reduction, label smoothing, whether
    gradients are needed, and the values of ``logit_scale`` and ``logit_bias``, which must
    be equal on every rank: the global loss has one scale); a mismatch raises the same
    ValueError on every rank, naming what differs and each rank's value.
    """
    op = "clip_loss"
    grad = _needs_grad(x, y, scale, bias)
    ring = _setup(op, group, x, scale, bias, reduction=reduction, grad=grad,
                  ids=ids is not None, smoothing=float(label_smoothing))  # fmt: skip
    ids = ids.contiguous() if ids is not None else None
    return _ClipRing.apply(x, y, scale, bias, ids, ring, reduction, float(label_smoothing),
                           chunk_size)  # fmt: skip


# --------------------------------------------------------------------------------------
# SigLIP
# --------------------------------------------------------------------------------------


def _siglip_rows_rotation(ring, x, y, scale, bias, chunk):
    """(b_p,) per-image losses of this rank's images over the global batch of texts."""
    own, tags, shapes = _y_block(y, None)
    rows = 0.0
    with _InFlight() as inflight:
        for _, j, block in _ring_blocks(ring, own, tags, shapes, inflight):
            rows = rows + siglip_block_rows(x, block[0], scale, bias, ring.offset(j), chunk)
    return rows


def _siglip_grads_rotation(ring, x, y, scale, bias, w_rows, chunk):
    """(row losses, dX_p, dY_p, dscale share, dbias share) of sum_i w_i l_i."""
    rows = []

    def compute(j, y_j, _extras, dx, dy):
        _, _, s, b, r = siglip_block_grads(x, y_j, scale, bias, w_rows, ring.offset(j), chunk,
                                           dx_acc=dx, dy_acc=dy)  # fmt: skip
        rows.append(r)
        return s, b

    dx, dy, ds, db = _grad_rotation(ring, x, y, [], [], compute)
    return torch.stack(rows).sum(0), dx, dy, ds, db


class _SiglipRing(torch.autograd.Function):
    @staticmethod
    @without_autocast
    def forward(ctx, x, y, scale, bias, ring, reduction, chunk, fused):
        remember_backend(ctx)
        ctx.ring, ctx.reduction, ctx.chunk, ctx.fused = ring, reduction, chunk, fused
        weight = _reduction_weight(reduction, ring.total, clip=False)
        if fused:
            w = torch.full((x.shape[0],), weight, dtype=_acc_dtype(x), device=x.device)
            rows, dx, dy, ds, db = _siglip_grads_rotation(ring, x, y, scale, bias, w, chunk)
            total, ds, db = _all_reduce(ring, rows.sum() * weight, ds, db)
            kept = forward_grad_dtype(x.dtype)  # rounded to fp16 only after the upstream scale
            ctx.save_for_backward(x, y, scale, bias, dx.to(kept), dy.to(kept), ds, db)
            return total.to(rows.dtype, copy=True)
        rows = _siglip_rows_rotation(ring, x, y, scale, bias, chunk)
        ctx.save_for_backward(x, y, scale, bias)
        if reduction == "none":
            return rows
        (total,) = _all_reduce(ring, rows.sum() * weight)
        return total.to(rows.dtype, copy=True)

    @staticmethod
    @first_order_only("siglip_loss")
    @in_forward_backend
    @without_autocast
    def backward(ctx, grad):
        x, y, scale, bias, *saved = ctx.saved_tensors
        ring = ctx.ring
        if ctx.fused:
            dx, dy, ds, db = (grad * t for t in saved)
        else:
            w = grad.expand(x.shape[0]) * _reduction_weight(ctx.reduction, ring.total, False)
            w = w.to(_acc_dtype(x)).contiguous()
            _, dx, dy, ds, db = _siglip_grads_rotation(ring, x, y, scale, bias, w, ctx.chunk)
            ds, db = _all_reduce(ring, ds, db)
        return _param_grads(ctx, dx, dy, ds, db, x, y, scale, bias)


@_not_traced
def siglip_loss_ring(x, y, scale, bias, group, chunk_size, reduction):
    r"""SigLIP loss of the global batch from this rank's shard, on a ring of ``group``.

    Called by ``vlmkernels.siglip_loss(..., process_group=group)``. Arguments as in
    :func:`clip_loss_ring`; the loss is ``-sum_ij logsigmoid(z_ij S_ij) / N`` over the
    global N x N logits ("mean", open_clip's normalisation; "sum" without the 1 / N), or
    with ``"none"`` the (b_r,) per-image losses of this rank's images.

    Gradients: as :func:`clip_loss_ring` (x, y: this rank's slice of the global gradient;
    scale and bias: the full global gradient on every rank; the same DDP note applies).
    A scalar loss that needs gradients computes them in its forward rotation, for the
    weights of the loss itself; backward scales them by the upstream gradient, which is
    exact when every rank backpropagates the same upstream gradient (``loss.backward()``
    on every rank, or any factor common to all ranks). With ``reduction="none"`` backward
    runs a gradient rotation with each rank's own upstream weights (exact for any).
    """
    op = "siglip_loss"
    grad = _needs_grad(x, y, scale, bias)
    ring = _setup(op, group, x, scale, bias, reduction=reduction, grad=grad)
    fused = grad and reduction != "none"
    return _SiglipRing.apply(x, y, scale, bias, ring, reduction, chunk_size, fused)
