"""The cross-rank consistency exchange of vlmkernels' distributed code.

Every distributed entry point (the ring mode of ``clip_loss`` / ``siglip_loss``, and
``vlmkernels.nn.ClipLoss`` / ``SigLipLoss`` with ``world_size > 1``) starts with one call
of :func:`exchange` before anything else is communicated: an all-gather of one float64
vector of named fields per rank (its local batch size, what must agree between ranks, and
whether its own arguments failed their checks). Each caller sends the same fields whatever
its arguments, so the all-gather itself cannot fail or hang; reading the table back is one
host synchronisation. Every rank then runs the same checks on the same table and raises the
same error (:func:`check_agree`), instead of some ranks going on into an exchange that the
others never join.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch
import torch.distributed as dist


def exchange(group, device: torch.device, fields: Mapping[str, float | torch.Tensor]) -> list[dict]:
    """Every rank's ``fields``, as dicts in the group's rank order.

    Values are numbers (sent as float64: integers up to 2^53 are exact) or one-element
    tensors, which are copied into the vector on ``device`` without a host synchronisation
    (e.g. a logit scale on the GPU). ``device``: where the group's collectives take tensors
    (the CPU for gloo, the current CUDA device for NCCL).
    """
    names = list(fields)
    numbers = [0.0 if isinstance(v, torch.Tensor) else float(v) for v in fields.values()]
    mine = torch.tensor(numbers, dtype=torch.float64, device=device)
    for i, v in enumerate(fields.values()):
        if isinstance(v, torch.Tensor):
            mine[i] = v.detach().reshape(()).to(device=device, dtype=torch.float64)
    gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, mine, group=group)
    rows = torch.stack(gathered).cpu().tolist()
    return [dict(zip(names, row, strict=True)) for row in rows]


def _same(a: float, b: float) -> bool:
    return a == b or (math.isnan(a) and math.isnan(b))


def check_agree(op: str, table: list[dict], describe: Mapping[str, tuple[str, Callable]]) -> None:
    """Raises ValueError (the same on every rank) at the first field of ``describe`` whose
    value differs between the ranks of ``table``: ``describe[field]`` is (what the field
    is, in words or the argument's name; how one value reads). NaN agrees with NaN."""
    for key, (what, show) in describe.items():
        values = [row[key] for row in table]
        if not all(_same(v, values[0]) for v in values):
            per_rank = ", ".join(f"rank {r}: {show(v)}" for r, v in enumerate(values))
            raise ValueError(
                f"{op}: the ranks of the process group disagree on {what} ({per_rank}); "
                "every rank must pass the same"
            )
