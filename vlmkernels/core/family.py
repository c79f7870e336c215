"""Op families declare themselves here; the shared tools iterate over the declarations.

A family (``vlmkernels/ops/<name>/``) builds one :class:`Family` in its ``family.py`` and
passes it to :func:`register` when it is imported. What the declaration carries, and who
reads it:

- ``kernels``: its Triton kernels (``@tuned``), and ``compile_cases``: each compile-time
  variant the ops can launch, with the argument types Triton's launcher would specialise for
  a typical call (``scripts/compile_check.py``, ``vlmkernels inspect``, the compile tests);
- ``aliases``: op names a user may pass to ``vlmkernels tune`` for its kernels;
  ``tune_shapes`` and ``tune_workload``: the realistic shapes the tuner runs, and how
  (:mod:`.tuner`);
- ``cuda_ops`` and ``compare_backends``: the backend-choice names that have CUDA C++
  kernels (``csrc/<family>/``), and how the tuner times them against Triton;
- ``compare_designs``: how the tuner times the family's alternative designs of one
  computation (``compare_designs(shapes, device, bench, log)`` returns
  {choice: {design: ms, ..., "shapes": n}}); the faster is recorded in ``designs.json``
  (:func:`.configs.preferred_design`);
- ``bench_suite``: the module of its benchmark suite (``benchmarks/bench_<name>.py``).

Nothing here imports a family: importing ``vlmkernels`` imports every family under
``vlmkernels/ops/`` (``vlmkernels.ops``), which registers them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["CompileCase", "Family", "cuda_ops", "families", "family", "register"]


@dataclasses.dataclass(frozen=True)
class CompileCase:
    """One compile-time variant of a Triton kernel, as a typical launch specialises it.

    Attributes:
        name: a label, unique in the family ("clip_stats_targets").
        kernel: the kernel (a :class:`~.tuning.TunedKernel`).
        pointers: pointer arguments and their Triton types; ``{elem}`` stands for the
            element type of the inputs ("bf16", "fp16" or "fp32"), as in ``"*{elem}"``.
        constexprs: the constexpr arguments, or a function of the input dtype name
            ("bf16", "fp16", "fp32") returning them; the config's are added per config.
        unit_strides: stride arguments that are 1 for contiguous inputs (become constants).
        aligned: integer arguments that are multiples of 16 (divisibility hints).
        scalars: non-pointer arguments that are not ``i32`` ({"scaling": "fp32"}).
        expect: what the compile check asserts of every config: "mma" (tensor-core
            instructions), "async" (pipelined asynchronous loads, for 16-bit inputs),
            "no_spill" (no register spills).
    """

    name: str
    kernel: Any
    pointers: Mapping[str, str]
    constexprs: Mapping[str, Any] | Callable[[str], Mapping[str, Any]]
    unit_strides: tuple[str, ...] = ()
    aligned: tuple[str, ...] = ()
    scalars: Mapping[str, str] = dataclasses.field(default_factory=dict)
    expect: tuple[str, ...] = ()

    def constants(self, dtype: str) -> dict:
        """The constexprs for inputs of ``dtype`` (without the config's)."""
        values = self.constexprs(dtype) if callable(self.constexprs) else self.constexprs
        return dict(values)

    def pointer_types(self, dtype: str) -> dict[str, str]:
        return {name: kind.replace("{elem}", dtype) for name, kind in self.pointers.items()}


@dataclasses.dataclass(frozen=True)
class Family:
    """What an op family tells the shared tools (see the module docstring)."""

    name: str
    kernels: tuple = ()
    compile_cases: Callable[[], list[CompileCase]] | None = None
    aliases: Mapping[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)
    tune_shapes: tuple[Mapping[str, Any], ...] = ()
    tune_workload: Callable | None = None
    cuda_ops: tuple[str, ...] = ()
    compare_backends: Callable | None = None
    compare_designs: Callable | None = None
    bench_suite: str | None = None

    @property
    def kernel_names(self) -> tuple[str, ...]:
        return tuple(k.name for k in self.kernels)


_FAMILIES: dict[str, Family] = {}


def register(declaration: Family) -> Family:
    """Adds a family (once per name; a second registration of the same name replaces the
    first, as a module reload does)."""
    _FAMILIES[declaration.name] = declaration
    return declaration


def families() -> dict[str, Family]:
    """Every registered family, by name, in registration order."""
    return dict(_FAMILIES)


def family(name: str) -> Family:
    if name not in _FAMILIES:
        raise ValueError(f"unknown op family {name!r}; families: {', '.join(_FAMILIES)}")
    return _FAMILIES[name]


def cuda_ops() -> frozenset[str]:
    """Backend-choice names with CUDA C++ kernels, over every family."""
    return frozenset(op for f in _FAMILIES.values() for op in f.cuda_ops)
