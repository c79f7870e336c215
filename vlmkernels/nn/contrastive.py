r"""Drop-in replacements for open_clip's ``ClipLoss`` and ``SigLipLoss``, one process or many.

Same constructor arguments, ``forward`` signature and results as ``open_clip.loss``: the same
loss and the same gradients (features, ``logit_scale``, ``logit_bias``) on every rank,
including open_clip's gradient-scaling conventions; ``get_logits`` and ``get_ground_truth``
(for logging and evaluation) are open_clip's too. The losses are computed by the fused ops
(:func:`vlmkernels.clip_loss`, :func:`vlmkernels.contrastive_cross_entropy`,
:func:`vlmkernels.siglip_loss`), which never build a logits matrix.

Several processes (``world_size > 1``) use torch.distributed's default group, which must be
initialised; ``rank`` and ``world_size`` must be this process's rank and the group's size.
Notation: n ranks, rank r holds b_r image/text pairs (I_r, T_r), N = sum_k b_k, offset
o_r = b_0 + ... + b_{r-1} (r b with equal sizes), d the feature dim, loss_k the loss on rank k.
"Gradient to x" below is what ``loss_r.backward()`` on every rank leaves in x on rank r
(before any DDP averaging; with upstream gradients g_k the sums over k are weighted by g_k);
``logit_scale`` and ``logit_bias`` always get d loss_r / d s from their own rank only, as in
open_clip.

ClipLoss. The features of all ranks are all-gathered (I, T: (N, d)).

- ``local_loss=False``: loss_r = clip_loss(I, T), the full N x N problem on every rank (the
  same value everywhere; open_clip's text logits are the transposed image logits).
- ``local_loss=True``: loss_r = (CE(s I_r T^T + b, o_r + i) + CE(s T_r I^T + b, o_r + i)) / 2,
  one-direction cross-entropies of the b_r local rows over the N gathered columns.
- ``gather_with_grad=False``: the gather is not differentiable. Without local loss the
  local slot of the gathered tensors is the local (differentiable) tensor, so the gradient
  to I_r is d loss_r / d I_r; with local loss the gathered copy is detached too, so I_r gets
  gradient only through its own rows (image->text for I_r, text->image for T_r).
- ``gather_with_grad=True``: the gather's backward sums the gradients of the gathered
  tensors over ranks and returns this rank's rows (torch.distributed.nn.all_gather's
  semantics): the gradient to I_r is sum_k d loss_k / d I_r. Without local loss every rank
  holds the same loss, so this is n times the gradient of the global loss (open_clip's
  world-size scaling); with local loss it is the gradient of sum_k loss_k.

Local batch sizes may differ between ranks (an extension: open_clip's gather needs them
equal); the positives of rank r's rows are then its own global indices o_r + i.

SigLipLoss. loss_r = sum over blocks of -sum logsigmoid(z * (s I_r T_k^T + b)) / b_r, with
the local block (k = r, positives on the diagonal) and one negative-only block per other
rank's texts T_k, which reach rank r by ``dist_impl``:

- ``bidir``: (n - 1) // 2 hops exchanging with both neighbours, plus one hop to the right
  when n - 1 is odd (open_clip's ``NeighbourExchangeBidir`` / ``NeighbourExchange``);
- ``shift``: n - 1 hops to the right;
- ``reduce``: one broadcast per rank (the values of open_clip's n masked all_reduces);
- ``gather``: one all_gather.

Every exchange's backward sends the gradient back the way the tensor came and sums it at
its owner, so for every ``dist_impl`` the gradient to T_r is sum_k d loss_k / d T_r, to I_r
d loss_r / d I_r (I_r never leaves its rank). All ranks need the same local batch size.

Memory per rank, in elements (chunk: the rows of logit gradient the fused ops materialise
at once, 128 MiB by default, at least 2048 rows on the Triton path):

- ClipLoss, not local: gathered features 2 N d (plus 2 N d for the local slot put back
  without grad), O(N) statistics; backward: dI, dT for N rows (2 N d), an fp32 (N, d)
  accumulator and one chunk. open_clip: the same gathered features plus the N x N logits
  and their softmax and gradient (several N^2 tensors).
- ClipLoss, local: gathered features 2 N d, O(N) statistics; backward: gradients of the
  2 N d gathered columns and the local rows, an fp32 (N, d) accumulator, one chunk.
  open_clip: the gathered features plus two b_r x N logits matrices, their log-softmax
  and gradients (about 6 b_r N).
- SigLipLoss: the other ranks' texts kept for backward ((N - b) d, as open_clip's matmuls
  keep them), O(b) row losses, one chunk; backward: dI, dT per block (b d each, freed as
  they are summed). ``gather`` and ``reduce`` hold all N d received texts at once in the
  forward pass. open_clip: the same texts plus, per block, the b x b logits, labels, signed
  logits and logsigmoid buffer (about 4 N b in all). Each block's logit gradient is
  recomputed in backward (4 b^2 d multiply-adds per block against 3 for the fused
  single-block path, which would keep 2 b d of gradients per block instead of the text).

Every ``forward`` with world_size > 1 starts with the consistency exchange of
:mod:`vlmkernels.distributed.consistency` (the one the ring mode uses): an all_gather of
each rank's shapes, so that inputs a mode cannot take (unequal batch sizes where they must
be equal, feature dims or dtypes that differ, a wrong ``rank`` / ``world_size``) raise the
same ValueError on every rank instead of hanging in an exchange; arguments one rank's own
checks refuse (features, a ``logit_scale`` or ``logit_bias`` that is not a scalar) raise
there, and a ValueError naming that rank on the others. Reading the shapes back is one host
synchronisation per call. The values of ``logit_scale`` and ``logit_bias`` are not
compared: as in open_clip, each rank's loss uses its own. Horovod is not supported.

Gradients are first order only, as in the fused ops: after a backward with
``create_graph=True`` (which works), differentiating the gradients raises
NotImplementedError on every rank.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist
from torch import nn

from ..core.checks import FLOAT_DTYPES, check_int, scalar_tensor
from ..core.op import first_order_only
from ..core.runtime import autocast_pair
from ..distributed.consistency import exchange
from ..ops.contrastive import clip_loss, contrastive_cross_entropy, siglip_loss

SIGLIP_DIST_IMPLS = ("bidir", "shift", "reduce", "gather")
# the exchanges' backwards communicate: not differentiable again (the losses' are not either)
_first_order_only = first_order_only("vlmkernels.nn.ClipLoss / SigLipLoss exchanges")


# --------------------------------------------------------------------------------------
# Constructor checks
# --------------------------------------------------------------------------------------


def _check_world_args(cls: str, rank, world_size, use_horovod: bool = False) -> None:
    rank = check_int(f"vlmkernels.nn.{cls}", "rank", rank)
    world_size = check_int(f"vlmkernels.nn.{cls}", "world_size", world_size)
    if world_size < 1 or (world_size > 1 and not 0 <= rank < world_size):
        raise ValueError(
            f"vlmkernels.nn.{cls}: need world_size >= 1 and 0 <= rank < world_size, got "
            f"rank={rank}, world_size={world_size}"
        )
    if use_horovod and world_size > 1:
        raise NotImplementedError(
            f"vlmkernels.nn.{cls}: use_horovod=True is not supported; initialise "
            "torch.distributed (e.g. torchrun with NCCL) and pass use_horovod=False"
        )


# --------------------------------------------------------------------------------------
# The world of one forward call: checked on every rank before any exchange
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _World:
    rank: int
    size: int
    sizes: tuple[int, ...]  # local batch size of each rank
    nccl: bool

    @property
    def offset(self) -> int:
        return sum(self.sizes[: self.rank])

    @property
    def left(self) -> int:
        return (self.rank - 1) % self.size

    @property
    def right(self) -> int:
        return (self.rank + 1) % self.size


def _local_problem(img, txt) -> str | None:
    """What is wrong with this rank's features taken alone, or None."""
    for t, name in ((img, "image_features"), (txt, "text_features")):
        if not isinstance(t, torch.Tensor):
            return f"{name} must be a torch.Tensor, got {type(t).__name__}"
        if t.dtype not in FLOAT_DTYPES:
            return f"{name} must be a floating tensor, got {t.dtype}"
        if t.dim() != 2 or 0 in t.shape:
            return f"{name} must be a non-empty 2-D (batch, dim) tensor, got {tuple(t.shape)}"
    if img.shape != txt.shape:
        return (
            f"image_features and text_features must have the same shape, got "
            f"{tuple(img.shape)} and {tuple(txt.shape)}"
        )
    if img.dtype != txt.dtype or img.device != txt.device:
        return "image_features and text_features must have the same dtype and device"
    return None


def _collective_device(like) -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return like.device if isinstance(like, torch.Tensor) else torch.device("cpu")


def _local_error(cls: str, where: str, img, txt, scale, bias) -> Exception | None:
    """What the loss would raise on this rank's arguments taken alone, or None: the
    features' problem, then the loss op's own checks of ``logit_scale`` and ``logit_bias``
    (which would otherwise fail on this rank only, after the others had gone on)."""
    problem = _local_problem(img, txt)
    if problem:
        return ValueError(f"{where}: {problem}")
    op = "clip_loss" if cls == "ClipLoss" else "siglip_loss"
    try:
        scalar_tensor(op, "logit_scale", scale, img.device)
        scalar_tensor(op, "logit_bias", bias, img.device, optional=True)
    except (TypeError, ValueError) as error:
        return error
    return None


def _gather_descriptors(img, txt, rank: int, world_size: int, error) -> list:
    """Every rank's [rank, world_size, ok, batch, dim, dtype index] (the consistency
    exchange of :mod:`vlmkernels.distributed`); ``error``: this rank's local error."""
    batch, dim, dtype = (0, 0, -1) if error else (*img.shape, FLOAT_DTYPES.index(img.dtype))
    fields = dict(rank=rank, world_size=world_size, ok=error is None, batch=batch, dim=dim,
                  dtype=dtype)  # fmt: skip
    table = exchange(None, _collective_device(img), fields)
    return [[int(row[key]) for key in fields] for row in table]


def _world(cls: str, img, txt, scale, bias, rank: int, world_size: int,
           equal_sizes: str | None) -> _World:  # fmt: skip
    """The checked world of this call; every rank raises the same error (or its own local
    one) before any exchange. ``equal_sizes``: the mode that needs equal local batches."""
    where = f"vlmkernels.nn.{cls}(world_size={world_size})"
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            f"{where}: torch.distributed is not initialised; call "
            "torch.distributed.init_process_group() before the loss (the default group is "
            "used), or pass world_size=1"
        )
    error = _local_error(cls, where, img, txt, scale, bias)
    table = _gather_descriptors(img, txt, rank, world_size, error)
    claims = [(row[0], row[1]) for row in table]
    if claims != [(k, len(table)) for k in range(len(table))]:
        raise ValueError(
            f"{where}: rank and world_size must be each process's rank in, and the size of, "
            f"the default process group (size {len(table)}); (rank, world_size) passed by "
            f"the processes in group order: {claims}"
        )
    bad = [k for k, row in enumerate(table) if not row[2]]
    if error is not None:
        raise error
    if bad:
        raise ValueError(
            f"{where}: rank(s) {bad} rejected their arguments (see the error raised there)"
        )
    for column, what in ((4, "feature dim"), (5, "dtype")):
        values = [row[column] for row in table]
        if len(set(values)) > 1:
            if column == 5:
                values = [str(FLOAT_DTYPES[v]).removeprefix("torch.") for v in values]
            raise ValueError(f"{where}: every rank needs the same {what}; {what} by rank: {values}")
    sizes = tuple(row[3] for row in table)
    if equal_sizes and len(set(sizes)) > 1:
        raise ValueError(
            f"{where}: {equal_sizes} needs the same local batch size on every rank; local "
            f"batch sizes by rank: {list(sizes)}"
        )
    return _World(rank, world_size, sizes, dist.get_backend() == "nccl")


# --------------------------------------------------------------------------------------
# Collectives with autograd (open_clip's gradient semantics)
# --------------------------------------------------------------------------------------


def _padded(t: torch.Tensor, rows: int) -> torch.Tensor:
    """``t`` contiguous, with zero rows appended up to ``rows``."""
    if t.shape[0] == rows:
        return t.contiguous()
    out = t.new_zeros((rows, *t.shape[1:]))
    out[: t.shape[0]] = t
    return out


def _all_gather_rows(t: torch.Tensor, world: _World) -> torch.Tensor:
    """Every rank's (b_k, c) tensor concatenated in rank order (b_k may differ)."""
    top = max(world.sizes)
    out = t.new_empty((world.size, top, *t.shape[1:]))
    dist.all_gather(list(out.unbind(0)), _padded(t, top))
    out = out.flatten(0, 1)
    if top * world.size == sum(world.sizes):
        return out
    return torch.cat([out[k * top : k * top + b] for k, b in enumerate(world.sizes)])


def _reduce_scatter_rows(g: torch.Tensor, world: _World) -> torch.Tensor:
    """This rank's rows of the sum over ranks of the (N, c) tensors ``g``."""
    top = max(world.sizes)
    chunks = [_padded(c, top) for c in g.split(list(world.sizes))]
    if world.nccl:
        out = torch.empty_like(chunks[world.rank])
        dist.reduce_scatter(out, chunks)
    else:  # gloo has no list reduce_scatter: sum everything, keep ours
        full = torch.stack(chunks)
        dist.all_reduce(full)
        out = full[world.rank]
    return out[: world.sizes[world.rank]]


class _GatherRows(torch.autograd.Function):
    """All-gather along dim 0 whose backward sums the gradient over ranks and returns this
    rank's rows (torch.distributed.nn.all_gather's semantics, sizes may differ)."""

    @staticmethod
    def forward(ctx, tensor, world):
        ctx.world = world
        return _all_gather_rows(tensor, world)

    @staticmethod
    @_first_order_only
    def backward(ctx, grad):
        return _reduce_scatter_rows(grad, ctx.world), None


def _send_recv(sends, recvs) -> list[torch.Tensor]:
    """Point-to-point: ``sends`` (tensor, to rank), ``recvs`` (shaped like, from rank); the
    received tensors, once every transfer has completed."""
    sends = [(t.contiguous(), peer) for t, peer in sends]
    bufs = [torch.empty_like(like, memory_format=torch.contiguous_format) for like, _ in recvs]
    ops = [dist.P2POp(dist.isend, t, peer) for t, peer in sends]
    ops += [dist.P2POp(dist.irecv, buf, peer) for buf, (_, peer) in zip(bufs, recvs, strict=True)]
    for req in dist.batch_isend_irecv(ops):
        req.wait()
    return bufs


class _Shift(torch.autograd.Function):
    """Send ``tensor`` to ``to_rank``, return what ``from_rank`` sent; backward sends the
    gradient back (open_clip's ``NeighbourExchange``)."""

    @staticmethod
    def forward(ctx, tensor, from_rank, to_rank):
        ctx.peers = from_rank, to_rank
        return _send_recv([(tensor, to_rank)], [(tensor, from_rank)])[0]

    @staticmethod
    @_first_order_only
    def backward(ctx, grad):
        from_rank, to_rank = ctx.peers
        return _send_recv([(grad, from_rank)], [(grad, to_rank)])[0], None, None


class _ShiftBoth(torch.autograd.Function):
    """Send ``to_left`` left and ``to_right`` right; return (from the right, from the left);
    backward sends each gradient back to where its tensor came from (open_clip's
    ``NeighbourExchangeBidir``)."""

    @staticmethod
    def forward(ctx, to_left, to_right, left, right):
        ctx.peers = left, right
        from_right, from_left = _send_recv(
            [(to_right, right), (to_left, left)], [(to_left, right), (to_right, left)]
        )
        return from_right, from_left

    @staticmethod
    @_first_order_only
    def backward(ctx, grad_from_right, grad_from_left):
        left, right = ctx.peers
        grad_to_left, grad_to_right = _send_recv(
            [(grad_from_right, right), (grad_from_left, left)],
            [(grad_from_right, left), (grad_from_left, right)],
        )
        return grad_to_left, grad_to_right, None, None


class _BroadcastEach(torch.autograd.Function):
    """Every rank's tensor on every rank, one broadcast per rank (the values of open_clip's
    masked all_reduces); backward sums each gradient onto its owner with a reduce."""

    @staticmethod
    def forward(ctx, tensor, world):
        ctx.world = world
        outs = []
        for src in range(world.size):
            if src == world.rank:
                buf = tensor.clone(memory_format=torch.contiguous_format)
            else:
                buf = torch.empty_like(tensor, memory_format=torch.contiguous_format)
            dist.broadcast(buf, src=src)
            outs.append(buf)
        return tuple(outs)

    @staticmethod
    @_first_order_only
    def backward(ctx, *grads):
        mine = None
        for dst, g in enumerate(grads):
            g = g.clone(memory_format=torch.contiguous_format)  # reduce may write into it
            dist.reduce(g, dst=dst)
            if dst == ctx.world.rank:
                mine = g
        return mine, None


# --------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------


def _with_own_slot(gathered: torch.Tensor, local: torch.Tensor, world: _World) -> torch.Tensor:
    """The gathered (N, d) tensor with this rank's rows replaced by the local tensor."""
    o, b = world.offset, world.sizes[world.rank]
    return torch.cat((gathered[:o], local, gathered[o + b :]))


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


# --------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------


class ClipLoss(nn.Module):
    """open_clip ``ClipLoss``: ``(CE(s I T^T [+ b], arange) + CE(s T I^T [+ b], arange)) / 2``.

    With one process ``local_loss``, ``gather_with_grad``, ``cache_labels``, ``rank`` and
    ``use_horovod`` do not change the result. With ``world_size > 1`` see the module
    docstring for what each (``local_loss``, ``gather_with_grad``) mode computes, where its
    gradients flow and its memory; ``use_horovod=True`` raises NotImplementedError.
    """

    def __init__(
        self,
        local_loss: bool = False,
        gather_with_grad: bool = False,
        cache_labels: bool = False,
        rank: int = 0,
        world_size: int = 1,
        use_horovod: bool = False,
    ):
        super().__init__()
        _check_world_args("ClipLoss", rank, world_size, use_horovod)
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad
        self.cache_labels = cache_labels
        self.rank = rank
        self.world_size = world_size
        self.use_horovod = use_horovod

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale,
        logit_bias=None,
        output_dict: bool = False,
    ):
        if self.world_size > 1:
            loss = self._distributed_loss(image_features, text_features, logit_scale, logit_bias)
        else:
            loss = clip_loss(image_features, text_features, logit_scale, logit_bias)
        return {"contrastive_loss": loss} if output_dict else loss

    def get_logits(self, image_features, text_features, logit_scale, logit_bias=None):
        """open_clip's ``(logits_per_image, logits_per_text)``, as matrices in memory (for
        logging or evaluation; the loss never builds them): ``s I T^T [+ b]`` and
        ``s T I^T [+ b]`` over this rank's rows, or with ``world_size > 1`` the gathered
        features of this call's mode ((N, N), or (b_r, N) with ``local_loss``; gradients
        as the loss's). open_clip adds ``logit_bias`` twice to the (N, N) logits of several
        processes without ``local_loss`` (its text logits are a view of the image logits,
        each incremented in place); here it is added once."""
        if self.world_size > 1:
            img, txt, all_img, all_txt, _ = self._gathered(image_features, text_features,
                                                           logit_scale, logit_bias)  # fmt: skip
            if self.local_loss:
                per_image, per_text = logit_scale * img @ all_txt.T, logit_scale * txt @ all_img.T
            else:
                per_image = logit_scale * all_img @ all_txt.T
                per_text = per_image.T
        else:
            per_image = logit_scale * image_features @ text_features.T
            per_text = logit_scale * text_features @ image_features.T
        if logit_bias is not None:
            per_image, per_text = per_image + logit_bias, per_text + logit_bias
        return per_image, per_text

    def get_ground_truth(self, device, num_logits) -> torch.Tensor:
        """open_clip's labels: ``arange(num_logits)``, shifted by ``num_logits * rank`` with
        ``local_loss`` and ``world_size > 1`` (equal local batches; the loss itself takes
        each rank's offset, sizes may differ)."""
        labels = torch.arange(num_logits, device=device, dtype=torch.long)
        if self.world_size > 1 and self.local_loss:
            labels = labels + num_logits * self.rank
        return labels

    def _gathered(self, img, txt, scale, bias):
        """(img, txt, all_img, all_txt, world) of a call with ``world_size > 1``: the
        checked world and every rank's features in rank order, with the gradients of this
        mode (open_clip's ``gather_features``)."""
        img, txt = autocast_pair(img, txt)
        world = _world("ClipLoss", img, txt, scale, bias, self.rank, self.world_size,
                       equal_sizes=None)  # fmt: skip
        d = img.shape[1]
        if self.gather_with_grad:
            gathered = _GatherRows.apply(torch.cat((img, txt), dim=1), world)
        else:
            gathered = _all_gather_rows(torch.cat((img.detach(), txt.detach()), dim=1), world)
        all_img, all_txt = gathered[:, :d], gathered[:, d:]
        if not (self.local_loss or self.gather_with_grad):
            all_img = _with_own_slot(all_img, img, world)
            all_txt = _with_own_slot(all_txt, txt, world)
        return img, txt, all_img, all_txt, world

    def _distributed_loss(self, img, txt, scale, bias):
        img, txt, all_img, all_txt, world = self._gathered(img, txt, scale, bias)
        if self.local_loss:
            return self._local_loss(img, txt, all_img, all_txt, scale, bias, world.offset)
        return clip_loss(all_img, all_txt, scale, bias)

    @staticmethod
    def _local_loss(img, txt, all_img, all_txt, scale, bias, offset: int):
        # contrastive_cross_entropy follows autocast itself (the loss fp32 under it)
        i2t = contrastive_cross_entropy(img, all_txt, scale, bias, offset=offset)
        t2i = contrastive_cross_entropy(txt, all_img, scale, bias, offset=offset)
        acc = _acc_dtype(i2t.dtype)
        return ((i2t.to(acc) + t2i.to(acc)) / 2).to(i2t.dtype)


class SigLipLoss(nn.Module):
    """open_clip ``SigLipLoss``: ``-sum_ij logsigmoid(z_ij (s I_i . T_j + b)) / N``.

    With one process ``cache_labels``, ``rank`` and ``dist_impl`` do not change the result;
    ``chunk_size`` (newer open_clip releases) is accepted: this loss is always computed in
    chunks. With ``world_size > 1`` see the module docstring for each ``dist_impl``.
    """

    def __init__(
        self,
        cache_labels: bool = False,
        rank: int = 0,
        world_size: int = 1,
        dist_impl: str | None = None,
        chunk_size: int = 0,
    ):
        super().__init__()
        _check_world_args("SigLipLoss", rank, world_size)
        self.cache_labels = cache_labels
        self.rank = rank
        self.world_size = world_size
        self.dist_impl = dist_impl or "bidir"
        if self.dist_impl not in SIGLIP_DIST_IMPLS:
            raise ValueError(
                "SigLipLoss: dist_impl must be one of 'bidir', 'shift', 'reduce', 'gather'; "
                f"got {dist_impl!r}"
            )
        self.chunk_size = chunk_size

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale,
        logit_bias,
        output_dict: bool = False,
    ):
        if self.world_size > 1:
            loss = self._distributed_loss(image_features, text_features, logit_scale, logit_bias)
        else:
            loss = siglip_loss(image_features, text_features, logit_scale, logit_bias)
        return {"contrastive_loss": loss} if output_dict else loss

    def get_logits(self, image_features, text_features, logit_scale, logit_bias=None):
        """open_clip's ``s I T^T [+ b]`` over this rank's rows, as a matrix in memory (for
        logging or evaluation; the loss never builds it)."""
        logits = logit_scale * image_features @ text_features.T
        return logits if logit_bias is None else logits + logit_bias

    def get_ground_truth(self, device, dtype, num_logits, negative_only=False) -> torch.Tensor:
        """open_clip's signs: ``2 I - 1`` (``-1`` everywhere with ``negative_only``)."""
        labels = -torch.ones((num_logits, num_logits), device=device, dtype=dtype)
        if not negative_only:
            labels = labels + 2 * torch.eye(num_logits, device=device, dtype=dtype)
        return labels

    def _distributed_loss(self, img, txt, scale, bias):
        img, txt = autocast_pair(img, txt)
        mode = f"dist_impl={self.dist_impl!r}"
        world = _world("SigLipLoss", img, txt, scale, bias, self.rank, self.world_size,
                       equal_sizes=mode)  # fmt: skip
        rows = siglip_loss(img, txt, scale, bias, reduction="none")
        out_dtype = rows.dtype
        loss = rows.to(_acc_dtype(out_dtype)).sum()
        for other in self._other_texts(txt, world):
            rows = siglip_loss(img, other, scale, bias, reduction="none", negative_only=True)
            loss = loss + rows.to(loss.dtype).sum()
        return (loss / img.shape[0]).to(out_dtype)

    def _other_texts(self, txt: torch.Tensor, world: _World):
        """The other ranks' text features (differentiable), in open_clip's order."""
        if self.dist_impl == "bidir":
            yield from _texts_bidir(txt, world)
        elif self.dist_impl == "shift":
            for _ in range(world.size - 1):
                txt = _Shift.apply(txt, world.left, world.right)
                yield txt
        elif self.dist_impl == "reduce":
            texts = _BroadcastEach.apply(txt, world)
            yield from (t for k, t in enumerate(texts) if k != world.rank)
        else:
            texts = _GatherRows.apply(txt, world).split(list(world.sizes))
            yield from (t for k, t in enumerate(texts) if k != world.rank)


def _texts_bidir(txt: torch.Tensor, world: _World):
    """(n - 1) // 2 exchanges with both neighbours (each yields the text from the right,
    then the one from the left), then one shift to the right if n - 1 is odd."""
    to_left = to_right = txt
    hops, remainder = divmod(world.size - 1, 2)
    for _ in range(hops):
        from_right, from_left = _ShiftBoth.apply(to_left, to_right, world.left, world.right)
        yield from_right
        yield from_left
        to_left, to_right = from_right, from_left
    if remainder:
        yield _Shift.apply(to_right, world.left, world.right)
