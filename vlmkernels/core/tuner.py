"""``vlmkernels tune``: time every config of the families' Triton kernels on the present GPU
at the families' realistic shapes and write the winners (:mod:`.tuning` reads them back).

Each family declares its kernels, op-name aliases, tuning shapes and the workload that runs
its ops on one shape (:class:`.family.Family`); a family with CUDA C++ kernels also declares
how to time them against its Triton kernels. Nothing here names a family.
"""

from __future__ import annotations

import pathlib
import warnings
from collections.abc import Callable, Mapping

import torch
import triton
from triton.testing import do_bench

from . import backend, runtime
from .family import families
from .tuning import (
    ConfigWarning,
    TunedKernel,
    _Call,
    _config_entry,
    _device_token,
    _kernel,
    _record,
    _write_winners,
    clear_cache,
    device_name,
    record_preferred_backend,
    record_preferred_design,
    user_config_dir,
)

__all__ = ["default_shapes", "kernel_names", "tune"]


def default_shapes() -> dict[str, list[dict]]:
    """The tuning shapes each registered family declares, by family."""
    return {name: [dict(s) for s in f.tune_shapes] for name, f in families().items()}


def _kernel_family() -> dict[str, str]:
    return {k: name for name, f in families().items() for k in f.kernel_names}


def kernel_names(selection=None) -> list[str]:
    """Kernel names for ``selection``: kernel names, op names a family aliases, or family
    names (None: every kernel)."""
    owner = _kernel_family()
    if selection is None:
        return list(owner)
    if isinstance(selection, str):
        selection = [selection]
    aliases = {a: ks for f in families().values() for a, ks in f.aliases.items()}
    aliases |= {name: f.kernel_names for name, f in families().items()}
    names: list[str] = []
    for item in selection:
        found = (item,) if item in owner else aliases.get(item)
        if found is None:
            known = sorted({*owner, *aliases})
            raise ValueError(f"tune: unknown kernel or op {item!r}; one of {', '.join(known)}")
        names += [n for n in found if n not in names]
    return names


def _private(call: _Call) -> tuple[tuple, dict]:
    """The recorded launch's arguments with each tensor on a copy of its storage (same
    offset and strides; tensors sharing a storage share the copy): the benchmark runs the
    launch hundreds of times, and must not write into the recorded tensors themselves.
    Recording is process-wide (autograd runs CUDA backwards on threads of its own), so a
    launch of another thread's call made while the workload ran is recorded too, and its
    caller may still be reading those outputs (a kernel that accumulates would add into
    them at every run)."""
    copies = {}

    def private(a):
        if not isinstance(a, torch.Tensor):
            return a
        storage = a.untyped_storage()
        key = (storage.data_ptr(), a.device)
        if key not in copies:
            copies[key] = storage.clone()
        return a.new_empty(0).set_(copies[key], a.storage_offset(), a.shape, a.stride())

    return tuple(private(a) for a in call.args), {k: private(v) for k, v in call.kwargs.items()}


def _bench_call(call: _Call, bench: Callable, log: Callable) -> dict:
    """Time one recorded launch with every config of its kernel's space, on copies of its
    tensors (:func:`_private`); the winner as a file entry (with its time and the default
    config's)."""
    kernel = call.kernel
    args, kwargs = _private(call)
    variant = dict(zip(kernel.file_key, call.key, strict=True))
    timings = {}
    for i, config in enumerate(kernel.space):
        if not kernel.allows(config, variant["dtype"], variant):
            log(f"  {kernel.name} {_config_entry(config)}: not in the space of "
                f"{kernel.bucket(call.key)}")  # fmt: skip
            continue
        try:
            timings[i] = float(bench(lambda c=config: kernel.launch(c, call.grid, args, kwargs)))
        except Exception as exc:  # a config that does not compile or fit: skip it
            log(f"  {kernel.name} {_config_entry(config)}: skipped ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0][:160] if str(exc) else ''})")  # fmt: skip
    if not timings:
        raise RuntimeError(f"tune: no config of {kernel.name} ran for {kernel.bucket(call.key)}")
    best = min(timings, key=timings.get)
    entry = {**_config_entry(kernel.space[best]), "ms": round(timings[best], 5)}
    if 0 in timings:
        entry["default_ms"] = round(timings[0], 5)
    gain = f", x{timings[0] / timings[best]:.2f} over the default" if 0 in timings else ""
    log(f"  {kernel.name} {kernel.bucket(call.key)}: {_config_entry(kernel.space[best])} "
        f"{timings[best]:.4f} ms{gain}")  # fmt: skip
    return entry


def _tune_buckets(names: list[str], shapes: Mapping[str, list], device: torch.device,
                  bench: Callable, log: Callable) -> dict[str, dict[tuple, dict]]:  # fmt: skip
    """Run each family's workload on its shapes, record the launches of the kernels in
    ``names``, and benchmark the first launch of every (kernel, bucket): {kernel: {key:
    entry}}."""
    winners: dict[str, dict[tuple, dict]] = {n: {} for n in names}
    owner = _kernel_family()
    for name, declared in families().items():
        if declared.tune_workload is None or not any(owner.get(n) == name for n in names):
            continue
        for spec in shapes.get(name, ()):
            log(f"{name}: {dict(spec)}")
            with _record() as calls:
                declared.tune_workload(spec, device, names)
            firsts: dict[tuple, _Call] = {}
            for call in calls:
                if call.kernel.name in winners:
                    firsts.setdefault((call.kernel.name, call.key), call)
            calls.clear()
            for (kernel, key), call in firsts.items():
                if key not in winners[kernel]:
                    winners[kernel][key] = _bench_call(call, bench, log)
            firsts.clear()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return winners


def _compare_backends(shapes: Mapping[str, list], device: torch.device, name: str,
                      bench: Callable, out_dir: pathlib.Path, log: Callable,
                      selected: Mapping | None = None) -> dict[str, pathlib.Path]:  # fmt: skip
    """For each family with CUDA C++ kernels (among ``selected``, default all): time both
    backends on its tuning shapes (``compare_backends(shapes, device, bench, log)`` returns
    {op: {"triton": ms, "cuda": ms, "shapes": n}}) and record the faster, for device
    ``name``."""
    ok, why = backend.cuda_backend_status()
    if not ok:
        log(f"backends: not compared ({why})")
        return {}
    written = {}
    for family_name, declared in (selected or families()).items():
        if declared.compare_backends is None:
            continue
        totals = declared.compare_backends(shapes.get(family_name, ()), device, bench, log)
        for op, measured in totals.items():
            if not measured.get("shapes"):
                log(f"backends: {op} not recorded (no shape ran on both backends)")
                continue
            best = min(("triton", "cuda"), key=lambda b: measured[b])
            log(f"backends: {op} triton {measured['triton']:.3f} ms, cuda "
                f"{measured['cuda']:.3f} ms over {measured['shapes']} shapes: {best}")  # fmt: skip
            written["backends"] = record_preferred_backend(
                op, best, name, out_dir, triton_ms=round(measured["triton"], 5),
                cuda_ms=round(measured["cuda"], 5), shapes=measured["shapes"],
            )  # fmt: skip
    return written


def _compare_designs(shapes: Mapping[str, list], device: torch.device, name: str,
                     bench: Callable, out_dir: pathlib.Path, log: Callable,
                     selected: Mapping | None = None) -> dict[str, pathlib.Path]:  # fmt: skip
    """For each family with alternative designs (among ``selected``, default all): time them
    on its tuning shapes (``compare_designs(shapes, device, bench, log)`` returns
    {choice: {design: ms, ..., "shapes": n}}) and record the fastest, for device ``name``."""
    written = {}
    for family_name, declared in (selected or families()).items():
        if declared.compare_designs is None:
            continue
        totals = declared.compare_designs(shapes.get(family_name, ()), device, bench, log)
        for choice, measured in totals.items():
            times = {k: v for k, v in measured.items() if k != "shapes"}
            if not measured.get("shapes") or not times:
                log(f"designs: {choice} not recorded (no shape ran)")
                continue
            best = min(times, key=times.get)
            log(f"designs: {choice} " + ", ".join(f"{k} {v:.3f} ms" for k, v in times.items())
                + f" over {measured['shapes']} shapes: {best}")  # fmt: skip
            written["designs"] = record_preferred_design(
                choice, best, name, out_dir, shapes=measured["shapes"],
                **{f"{k}_ms": round(v, 5) for k, v in times.items()},
            )  # fmt: skip
    return written


def tune(
    kernels=None, device=None, out_dir=None, shapes=None, log=print
) -> dict[str, pathlib.Path]:
    """Autotune the Triton kernels on the present GPU and write the winners.

    Args:
        kernels: kernel names, op names the families alias to their kernels (``clip_loss``,
            ``mrope``, ...) or family names (``contrastive``, ``rope``); None: every kernel.
        device: the CUDA device (index, "cuda:i" or ``torch.device``); None: the current.
        out_dir: where the files go (``<out_dir>/<device>/<kernel>.json``); default the
            user directory (``VLMKERNELS_CONFIG_DIR``, else ``~/.cache/vlmkernels/configs``),
            which the lookup reads first.
        shapes: per family, a list of shape specs replacing its declared tuning shapes
            (:func:`default_shapes`; each family's ``tune_workload`` documents its keys).
        log: called with one line of progress at a time.

    Each shape runs the family's ops once through their Triton launchers, recording the
    kernel launches; the first launch of every (kernel, bucket) is timed with each config of
    the kernel's space by ``triton.testing.do_bench`` (median) on those real inputs, and the
    fastest is merged into the kernel's file (entries of other buckets are kept). Where the
    CUDA C++ extension is available, families with CUDA C++ kernels time both backends on
    their shapes and the faster is recorded in ``backends.json``; families with alternative
    designs (the CLIP backward) time them and record the fastest in ``designs.json``. The
    in-process caches are cleared, so later launches use the new files.

    Returns {kernel name, "backends" or "designs": file written}. Raises RuntimeError without a CUDA
    device or under Triton's interpreter, ValueError for an unknown name.
    """
    names = kernel_names(kernels)
    specs = {**default_shapes(), **{k: list(v) for k, v in (shapes or {}).items()}}
    unknown = set(specs) - set(families())
    if unknown:
        raise ValueError(f"tune: shapes for unknown families {sorted(unknown)}")
    if not torch.cuda.is_available():
        raise RuntimeError(
            "vlmkernels tune needs a CUDA device: it benchmarks the Triton kernels on the GPU "
            "they will run on (torch.cuda.is_available() is False here)"
        )
    if runtime.INTERPRETED:
        raise RuntimeError("vlmkernels tune cannot run under Triton's interpreter "
                           "(TRITON_INTERPRET=1): unset it")  # fmt: skip
    token = _device_token(device)
    if not isinstance(token, int):
        raise ValueError(f"tune: device must be a CUDA device, not the name {device!r}")
    dev = torch.device("cuda", token)
    name = device_name(dev)
    out = pathlib.Path(out_dir).expanduser() if out_dir else user_config_dir()
    kernel_objs: dict[str, TunedKernel] = {n: _kernel(n) for n in names}
    owner = _kernel_family()
    selected = {f: families()[f] for f in dict.fromkeys(owner[n] for n in names)}

    def bench(fn):
        return do_bench(fn, warmup=25, rep=100, return_mode="median")

    log(f"tuning {', '.join(names)} on {name} (triton {triton.__version__}) into {out}")
    try:
        with torch.cuda.device(dev), backend.use_backend("triton"), warnings.catch_warnings():
            warnings.simplefilter("ignore", ConfigWarning)
            winners = _tune_buckets(names, specs, dev, bench, log)
            written = {}
            for n, entries in winners.items():
                if entries:
                    written[n] = _write_winners(kernel_objs[n], name, entries, out, log)
                    log(f"wrote {written[n]} ({len(entries)} buckets)")
            clear_cache()
            written.update(_compare_backends(specs, dev, name, bench, out, log, selected))
            written.update(_compare_designs(specs, dev, name, bench, out, log, selected))
    finally:
        # also where a later step raised: the files written before it hold the new configs,
        # which the caches (filled by the workloads' launches) would hide from this process
        clear_cache()
    return written
