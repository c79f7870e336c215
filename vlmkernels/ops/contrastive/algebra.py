"""The block algebra of the contrastive losses: what the targets of a block of logits are
(:class:`Targets`), and the per-sample statistics that make its cross-entropies
(:class:`SideStats`).

A loss over a logit matrix split into blocks (chunks of rows on one device, or the ranks'
blocks on a ring) needs per row and per column only O(1) statistics over the other side,
each additive across blocks (:meth:`SideStats.merge`); the losses and the gradient
coefficients follow from the complete statistics. Plain PyTorch on O(N) tensors; the
Triton and PyTorch paths (:mod:`.launchers`, :mod:`.reference`) produce and consume them.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from ...core.runtime import cast

__all__ = [
    "SideStats",
    "Targets",
    "coefficients_from_state",
    "ids_count",
    "onehot_col_dot",
    "onehot_count",
    "without_target",
]


@dataclasses.dataclass(frozen=True)
class Targets:
    r"""Cross-entropy targets of a block of logits S (M x N), per direction.

    Positive pairs ("hard"): equal ids (``row_ids`` (M,), ``col_ids`` (N,)) if given, else
    col = row + ``offset``. For a row i with c_i positives among n classes, and teacher
    logits T = s_t X_t Y_t^T (``teacher`` = (X_t, Y_t, s_t), same shapes as X, Y):

        t_ij = (1 - alpha) ((1 - smoothing) hard_ij / c_i + smoothing / n)
               + alpha softmax_j(T_i.)

    and likewise for columns. The cross-entropy is lse_j(S_i.) - sum_j t_ij S_ij.

    ``alpha`` is a float, or a 0-d tensor (with a teacher; what the ops get under
    torch.compile): then every formula uses it elementwise, without reading its value on
    the host, alpha = 0 included.
    """

    offset: int = 0
    row_ids: torch.Tensor | None = None
    col_ids: torch.Tensor | None = None
    smoothing: float = 0.0
    alpha: float | torch.Tensor = 0.0
    teacher: tuple | None = None

    @property
    def ids(self) -> bool:
        return self.row_ids is not None

    @property
    def distills(self) -> bool:
        """Whether the teacher's term is in the targets: alpha a tensor, or a float > 0."""
        return isinstance(self.alpha, torch.Tensor) or bool(self.alpha)

    def single_positives(self, m: int, n: int) -> tuple[bool, bool]:
        """Whether every row, and whether every column, of an M x N block has exactly one
        positive: targets without ids whose diagonal col = row + offset crosses the block
        (known without looking at the data; the losses and coefficients then skip the
        per-sample counts)."""
        if self.ids:
            return False, False
        o = self.offset
        return 0 <= o and m + o <= n, o <= 0 and n - o <= m


@dataclasses.dataclass
class SideStats:
    """Statistics of the rows (or the columns) of a logit block over the other side:
    fp32 (L,) tensors, additive across blocks of the other side (``merge``).
    ``single_positive``: every sample has exactly one positive (``hard_cnt`` is all ones)."""

    lse: torch.Tensor
    hard_dot: torch.Tensor  # sum of S over positive pairs
    hard_cnt: torch.Tensor  # number of positive pairs
    logit_sum: torch.Tensor | None = None  # sum of S (label smoothing)
    teacher_dot: torch.Tensor | None = None  # sum of softmax(T) S (distillation)
    single_positive: bool = False

    def merge(self, other: SideStats) -> SideStats:
        def add(a, b):
            return None if a is None else a + b

        return SideStats(
            torch.logaddexp(self.lse, other.lse),
            self.hard_dot + other.hard_dot,
            self.hard_cnt + other.hard_cnt,
            add(self.logit_sum, other.logit_sum),
            add(self.teacher_dot, other.teacher_dot),
        )

    def losses(self, targets: Targets, n_classes: int) -> torch.Tensor:
        """Per-sample cross-entropy lse - sum_j t_ij S_ij once the stats are complete; NaN
        for a sample without positives whose targets need one (alpha < 1)."""
        if self.single_positive:
            dot = self.hard_dot
        else:
            dot = self.hard_dot / self.hard_cnt.clamp_min(1)
            dot = torch.where(without_target(self.hard_cnt, targets), math.nan, dot)
        if targets.smoothing:
            dot = (1 - targets.smoothing) * dot + targets.smoothing / n_classes * self.logit_sum
        if targets.distills:
            dot = (1 - targets.alpha) * dot + targets.alpha * self.teacher_dot
        return self.lse - dot

    def coefficients(self, targets: Targets, n_classes: int, weights: torch.Tensor,
                     teacher_lse: torch.Tensor | None) -> torch.Tensor:  # fmt: skip
        """(6, L), in the dtype of the stats, for the gradient kernel: (lse, u, h, e, a,
        teacher lse) with u the upstream weights, h = u (1 - alpha)(1 - smoothing) / c,
        e = u (1 - alpha) smoothing / n, a = u alpha. u is NaN for a sample whose loss is
        NaN (no target) and whose upstream weight is not 0, so that every gradient its loss
        reaches is NaN too. Rows e, a and the teacher lse are read only with label
        smoothing, distillation and a teacher respectively (zeros otherwise)."""
        u = cast(weights, self.lse.dtype)
        keep = 1 - targets.alpha
        if self.single_positive:
            plain = not targets.distills and not targets.smoothing  # keep = 1
            h = u if plain else u * (keep * (1 - targets.smoothing))
        else:
            u = torch.where(without_target(self.hard_cnt, targets) & (u != 0), math.nan, u)
            h = torch.where(self.hard_cnt > 0, u * keep * (1 - targets.smoothing)
                            / self.hard_cnt.clamp_min(1), 0.0)  # fmt: skip
        zeros = None
        if not (targets.smoothing and targets.distills and teacher_lse is not None):
            zeros = torch.zeros_like(u)
        e = u * (keep * targets.smoothing / n_classes) if targets.smoothing else zeros
        a = u * targets.alpha if targets.distills else zeros
        t_lse = cast(teacher_lse, u.dtype) if teacher_lse is not None else zeros
        return torch.stack((self.lse, u, h, e, a, t_lse))


def without_target(hard_cnt: torch.Tensor, targets: Targets) -> torch.Tensor:
    """Samples whose targets are undefined: no positive pair, and a hard part that needs
    one ((1 - alpha) > 0; elementwise for a tensor alpha)."""
    return (hard_cnt == 0) & (targets.alpha < 1)


def onehot_count(m: int, n: int, offset: int, device, dtype=torch.float32) -> torch.Tensor:
    """(M,) positive counts of the rows of an M x N block with positives at
    col = row + offset: 1 where that column exists, else 0. The columns' counts are
    ``onehot_count(n, m, -offset)``."""
    lo, hi = max(0, -offset), max(0, min(m, n - offset))
    if lo == 0 and hi == m:
        return torch.ones(m, dtype=dtype, device=device)
    count = torch.zeros(m, dtype=dtype, device=device)
    count[lo:hi] = 1
    return count


def ids_count(ids: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """(len(ids),) fp32: how many entries of ``other`` equal each of ``ids`` (the positive
    counts of rows with ids ``ids`` against columns with ids ``other``), by a sort and two
    binary searches: O((M + N) log N), independent of the logits."""
    ordered = torch.sort(other).values
    upper = torch.searchsorted(ordered, ids, right=True)
    return upper.sub_(torch.searchsorted(ordered, ids)).float()


def onehot_col_dot(row_dot: torch.Tensor, n: int, offset: int) -> torch.Tensor:
    """Column sums of S over positives from the rows' (the same pairs, col = row + offset)."""
    m = row_dot.shape[0]
    if offset == 0 and n == m:
        return row_dot
    col_dot = row_dot.new_zeros(n)
    lo, hi = max(0, offset), max(0, min(n, m + offset))  # the columns with a positive
    if hi > lo:
        col_dot[lo:hi] = row_dot[lo - offset : hi - offset]
    return col_dot


def coefficients_from_state(state, targets: Targets, n_classes: int, weights,
                            single_positive: bool = False):  # fmt: skip
    """(6, L) gradient coefficients from a saved (3, L) state (lse, count, teacher lse)."""
    lse, count, teacher_lse = state.unbind(0)
    side = SideStats(lse, lse, count, single_positive=single_positive)
    teacher_lse = teacher_lse if targets.teacher is not None else None
    return side.coefficients(targets, n_classes, weights, teacher_lse)
