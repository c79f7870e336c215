"""Reading SASS (``cuobjdump --dump-sass``): the instructions, the loops, the hot region and
its instruction mix. Pure text processing: no GPU, no Triton.

A loop is the address range from a backward branch's target to the branch (``BRA`` to a
lower address). Compilers lay loops out as nested ranges, so the loops form a tree. For a
kernel with matrix instructions the *tile* region is the smallest loop that strictly holds an
innermost loop issuing them (the k-loop): one iteration computes one output tile, its
k-loop counted once (a static count, independent of the reduction length). Without matrix
instructions the hot region is the innermost loop with the most memory instructions, and
without any loop it is the whole program.
"""

from __future__ import annotations

import dataclasses
import re
from collections import Counter

__all__ = ["Instruction", "Region", "hot_region", "local_memory_bytes", "loops", "mix", "parse"]

_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_PREDICATE = re.compile(r"^@!?U?P[T0-9]+\s+")
MMA_OPS = ("HGMMA", "HMMA", "QGMMA", "IMMA", "IGMMA", "BGMMA", "DMMA")
_MEMORY_OPS = ("LDG", "STG", "LDS", "STS", "LDSM", "LDGSTS", "LDL", "STL", "ATOM", "RED",
               "UTMALDG", "UTMASTG", "UBLKCP")  # fmt: skip
_WIDTHS = {"128": 128, "64": 64, "U16": 16, "S16": 16, "U8": 8, "S8": 8}


@dataclasses.dataclass(frozen=True)
class Instruction:
    address: int
    opcode: str  # with modifiers: "LDG.E.128.CONSTANT"
    text: str  # the whole instruction, predicate included

    @property
    def base(self) -> str:
        return self.opcode.split(".", 1)[0]

    def branch_target(self) -> int | None:
        if self.base not in ("BRA", "JMP"):
            return None
        targets = re.findall(r"0x([0-9a-f]+)", self.text)
        return int(targets[-1], 16) if targets else None


@dataclasses.dataclass(frozen=True)
class Region:
    """Instructions ``start`` .. ``end`` (addresses, inclusive); ``kind`` is "tile", "loop"
    or "program" (see the module docstring)."""

    start: int
    end: int
    kind: str

    def holds(self, other: Region) -> bool:
        return self.start <= other.start and other.end <= self.end and self != other

    def of(self, instructions: list[Instruction]) -> list[Instruction]:
        return [i for i in instructions if self.start <= i.address <= self.end]


def parse(sass: str) -> list[Instruction]:
    """The instructions of one function's SASS (``NOP`` padding left out)."""
    out = []
    for m in _LINE.finditer(sass):
        text = m.group(2).strip()
        body = _PREDICATE.sub("", text)
        if not body:
            continue
        opcode = body.split()[0]
        if opcode == "NOP":
            continue
        out.append(Instruction(int(m.group(1), 16), opcode, text))
    return out


def loops(instructions: list[Instruction]) -> list[Region]:
    """Every loop (backward branch range), outermost first; a branch to itself (the trap
    after ``EXIT``) is not a loop."""
    found = set()
    for ins in instructions:
        target = ins.branch_target()
        if target is not None and target < ins.address:
            found.add(Region(target, ins.address, "loop"))
    return sorted(found, key=lambda r: (r.start, -r.end))


def _innermost(regions: list[Region]) -> list[Region]:
    return [r for r in regions if not any(r.holds(o) for o in regions)]


def _count(instructions: list[Instruction], names: tuple[str, ...]) -> int:
    return sum(i.base in names for i in instructions)


def hot_region(instructions: list[Instruction]) -> Region:
    """The tile loop of a matrix kernel, else the busiest innermost loop, else the whole
    program (see the module docstring)."""
    regions = loops(instructions)
    inner = _innermost(regions)
    mma_loops = [r for r in inner if _count(r.of(instructions), MMA_OPS)]
    if mma_loops:
        parents = [r for r in regions if any(r.holds(m) for m in mma_loops)]
        if parents:
            tile = min(parents, key=lambda r: r.end - r.start)
            return dataclasses.replace(tile, kind="tile")
    elif inner:
        busiest = max(inner, key=lambda r: (_count(r.of(instructions), _MEMORY_OPS),
                                            r.end - r.start))  # fmt: skip
        return busiest
    if not instructions:
        return Region(0, 0, "program")
    return Region(instructions[0].address, instructions[-1].address, "program")


def _width(opcode: str) -> int:
    for part in opcode.split(".")[1:]:
        if part in _WIDTHS:
            return _WIDTHS[part]
    return 32


def mix(instructions: list[Instruction]) -> dict[str, int]:
    """The instruction mix: ``MMA`` (tensor-core instructions), ``FFMA``, ``FADD``, ``FMUL``,
    ``MUFU`` (and ``MUFU.EX2``-style subtotals), memory instructions by kind and width in
    bits (``LDG.128``, ``STG.16``, ``LDS.32``, ``LDSM``, ``LDGSTS.128``, ``LDL.32``...),
    ``SHFL``, ``BAR``, ``BRA`` and ``total``."""
    counts: Counter[str] = Counter()
    for ins in instructions:
        base = ins.base
        counts["total"] += 1
        if base in MMA_OPS:
            counts["MMA"] += 1
        elif base in ("FFMA", "FADD", "FMUL", "SHFL", "BAR", "BRA"):
            counts[base] += 1
        elif base == "MUFU":
            counts["MUFU"] += 1
            counts[".".join(ins.opcode.split(".")[:2])] += 1
        elif base in ("LDSM", "UTMALDG", "UTMASTG", "UBLKCP"):
            counts[base] += 1
        elif base in _MEMORY_OPS:
            counts[f"{base}.{_width(ins.opcode)}"] += 1
    return dict(sorted(counts.items()))


def local_memory_bytes(instructions: list[Instruction]) -> tuple[int, int]:
    """(bytes stored, bytes loaded) by the local-memory instructions (``STL``, ``LDL``),
    counted statically: register spills, and the local arrays of the functions a kernel
    calls (libdevice's sinf / cosf keep their large-argument reduction in one)."""
    stores = sum(_width(i.opcode) // 8 for i in instructions if i.base == "STL")
    loads = sum(_width(i.opcode) // 8 for i in instructions if i.base == "LDL")
    return stores, loads
