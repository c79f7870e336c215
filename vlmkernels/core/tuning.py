"""Triton kernels that launch with persisted configs: :class:`TunedKernel` (the decorator
:func:`tuned` replaces ``triton.autotune``), the registry of every kernel, and the lookup
API. The files and their rules are :mod:`.configs`; tuning is :mod:`.tuner`.

How a kernel launches (``kernel[grid](*args, **kwargs)``):

- under Triton's interpreter (``TRITON_INTERPRET=1``, the CPU tests): always the single
  interpreter config; no lookup, no warning;
- with ``VLMKERNELS_AUTOTUNE=1`` (opt-in): Triton's autotuner over the whole config space,
  benchmarking at the first call of every distinct value of the key (each new size: no
  buckets), in memory, as ``triton.autotune`` does, which keeps every result (launches are
  then not deterministic across processes; no file is read): for a few fixed shapes;
- otherwise (the default): the config :mod:`.configs` finds for the kernel's key on the
  current CUDA device, cached per (kernel, device, key): no benchmarking at run time, the
  same config for the same shapes in every process.

A family's launcher may :meth:`TunedKernel.prepare` a launch once per layout (kept in a
:func:`prepared_cache`) to skip the per-call key and lookup; a scalar that changes from call
to call (a ramped weight) is passed :data:`PER_CALL` there and given per call.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import inspect
import re
import threading
from collections.abc import Mapping
from typing import Any

import torch
import triton
from triton.runtime.jit import KernelInterface

from . import configs as _configs
from . import runtime
from .configs import (  # noqa: F401  (re-exported: the lookup API and its warnings)
    BACKENDS_FILE,
    CONFIG_DIR_ENV,
    FORMAT,
    PACKAGE_CONFIG_DIR,
    ConfigWarning,
    DefaultConfigWarning,
    MalformedConfigWarning,
    StaleConfigWarning,
    _config_entry,
    _config_signature,
    _device_token,
    _dtype_name,
    _key_value,
    _layers,
    _parse_bucket,
    _resolve,
    _write_winners,
    device_name,
    normalise_device_name,
    preferred_backend,
    preferred_design,
    record_preferred_backend,
    record_preferred_design,
    torch_dtype,
    user_config_dir,
)

# --------------------------------------------------------------------------------------
# The kernel wrapper
# --------------------------------------------------------------------------------------

_REGISTRY: dict[str, TunedKernel] = {}
_RECORDING: list | None = None  # launches seen while tune() runs a workload


@dataclasses.dataclass
class _Call:
    kernel: TunedKernel
    key: tuple
    grid: Any
    args: tuple
    kwargs: dict


def _python_function(obj):
    while not inspect.isfunction(obj):
        obj = obj.fn
    return obj


def _def_source(fn) -> str:
    src = inspect.getsource(fn)
    m = re.search(r"^[ \t]*def\s", src, flags=re.M)
    return src[m.start() :] if m else src


class TunedKernel(KernelInterface):
    """A Triton kernel (``@triton.jit``, possibly under ``@triton.heuristics``) launched
    with the config of :func:`lookup` (see the module docstring); the decorator is
    :func:`tuned`. ``configs`` is the list ``scripts/compile_check.py`` compiles, ``space``
    the GPU config space, ``fn`` the wrapped kernel."""

    def __init__(self, name, fn, configs, key, sizes, restore_value=None, interpreted=None,
                 defaults=None, variant_default=None, fits=None):  # fmt: skip
        self.name = name
        self.fn = fn
        self.arg_names = list(fn.arg_names)
        self.configs = configs
        self.space = list(getattr(configs, "space", configs))
        self.interpreter_config = getattr(configs, "interpreter", self.space[0])
        self.key_names = list(key)
        missing = [k for k in self.key_names if k not in self.arg_names]
        if missing or any(s not in self.key_names for s in sizes):
            raise ValueError(f"{name}: key {key} / sizes {sizes} must be argument names")
        self.file_key = self.key_names + ["dtype"]
        self.size_index = [self.file_key.index(s) for s in sizes]
        self.variant_index = [i for i in range(len(self.file_key)) if i not in self.size_index]
        self._positions = [self.arg_names.index(k) for k in self.key_names]
        self._by_signature = {_config_signature(c): c for c in self.space}
        self.dtype_defaults = dict(defaults or {})
        for dtype, config in self.dtype_defaults.items():
            if not any(config is c for c in self.space):
                raise ValueError(f"{name}: the {dtype} default must be a config of the space")
        self.variant_default = variant_default
        self.fits = fits
        self.restore_value = restore_value
        self.interpreted = runtime.INTERPRETED if interpreted is None else interpreted
        # bounded as the prepared launches are: a key holds sizes (attention's max_lk, ToMe's
        # token count), which a server of prompts of every length varies every call
        self._cache: dict[tuple, triton.Config] = _configs.BoundedCache(PREPARED_LAYOUTS)
        self._autotuner = None
        _REGISTRY[name] = self

    @property
    def default(self) -> triton.Config:
        """The heuristic default: the first config of the space."""
        return self.space[0]

    def default_for(self, dtype, variant: Mapping | None = None) -> triton.Config:
        """The heuristic default for inputs of ``dtype`` (a torch dtype or "bf16" / "fp16"
        / "fp32"): the one :func:`tuned`'s ``variant_default`` gives for ``variant`` (the
        launch's key values or constexprs by name), else the one it names for the dtype,
        else :attr:`default`."""
        if self.variant_default is not None and variant is not None:
            config = self.variant_default({**variant, "dtype": _dtype_name(dtype)})
            if config is not None:
                if not any(config is c for c in self.space):
                    raise ValueError(f"{self.name}: a variant default must be a config of "
                                     "the space")  # fmt: skip
                return config
        return self.dtype_defaults.get(_dtype_name(dtype), self.space[0])

    def allows(self, config: triton.Config, dtype, variant: Mapping | None = None) -> bool:
        """Whether the tuner may pick ``config`` for inputs of ``dtype`` and this variant
        (:func:`tuned`'s ``fits``; every config without one)."""
        if self.fits is None:
            return True
        return bool(self.fits(config, {**(variant or {}), "dtype": _dtype_name(dtype)}))

    def space_for(self, dtype, variant: Mapping | None = None) -> list[triton.Config]:
        """The configs of the space the tuner may pick for ``dtype`` and this variant."""
        return [c for c in self.space if self.allows(c, dtype, variant)]

    @functools.cached_property
    def source_hash(self) -> str:
        """16 hex digits of SHA-256 over the source of the kernel and of the Triton
        functions it calls (transitively, by name, from its module's globals)."""
        root = _python_function(self.fn)
        todo, seen, parts = [root], set(), []
        while todo:
            fn = todo.pop(0)
            if fn in seen:
                continue
            seen.add(fn)
            src = _def_source(fn)
            parts.append(src)
            for name in dict.fromkeys(re.findall(r"\b[A-Za-z_]\w*\b", src)):
                obj = fn.__globals__.get(name)
                if isinstance(obj, KernelInterface) and not isinstance(obj, TunedKernel):
                    todo.append(_python_function(obj))
        return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]

    def key_of(self, args: tuple, kwargs: Mapping) -> tuple:
        """The lookup key of a launch: the key arguments' values, then the dtype name of
        the first tensor argument."""
        values = [
            _key_value(args[i] if i < len(args) else kwargs[name])
            for name, i in zip(self.key_names, self._positions, strict=True)
        ]
        first = args[0] if args else kwargs[self.arg_names[0]]
        values.append(_dtype_name(getattr(first, "dtype", "none")))
        return tuple(values)

    def key_from_mapping(self, key: Mapping) -> tuple:
        missing = [k for k in self.file_key if k not in key]
        if missing:
            raise KeyError(f"{self.name}: key needs {self.file_key}; missing {missing}")
        return tuple(_key_value(key[k]) for k in self.file_key)

    def bucket(self, key: tuple) -> str:
        """The bucket string of a key, as in the files."""
        return ",".join(f"{k}={v}" for k, v in zip(self.file_key, key, strict=True))

    def run(self, *args, grid, warmup=False, **kwargs):
        if _RECORDING is not None:
            _RECORDING.append(_Call(self, self.key_of(args, kwargs), grid, args, dict(kwargs)))
        if runtime.AUTOTUNE and not self.interpreted:
            if self._autotuner is None:
                self._autotuner = triton.autotune(
                    configs=list(self.space), key=self.key_names, restore_value=self.restore_value
                )(self.fn)
            return self._autotuner.run(
                *args, grid=grid, warmup=warmup, **{**runtime.fp_fusion(), **kwargs}
            )
        return self.launch(self._config(args, kwargs), grid, args, kwargs, warmup)

    def _config(self, args, kwargs):
        """The config a call with these arguments runs: the interpreter's, or the persisted
        one (:func:`_resolve`), looked up once per device and key."""
        if self.interpreted:
            return self.interpreter_config
        cache_key = (_configs._current_device(), self.key_of(args, kwargs))
        config = self._cache.get(cache_key)
        if config is None:
            since = _configs.generation()  # a clear_cache while resolving: not stored
            config = _resolve(self, _configs._device_name_of_index(cache_key[0]), cache_key[1])[0]
            _configs.store(self._cache, cache_key, config, since)
        return config

    def config(self, args, kwargs) -> triton.Config:
        """The config a launch with these arguments takes (see :meth:`run`); under
        ``VLMKERNELS_AUTOTUNE=1`` the autotuner may pick another. For building prepared
        launches (see :data:`_BUILDING`)."""
        _building_since()
        return self._config(args, kwargs)

    def prepare(self, grid, args, kwargs):
        """A launch for calls whose non-pointer arguments are ``args``' and ``kwargs``'
        (a family caches it per layout, in a :func:`prepared_cache`): ``launch(*pointers)``
        runs with the config :meth:`run` would pick, without its per-call key and lookup;
        the pointers come in the order of the signature, wherever the scalars sit, and with
        them, in that order, the scalars given as :data:`PER_CALL` (not key arguments);
        its ``config`` attribute is the config it runs. None while the tuner records launches,
        under ``VLMKERNELS_AUTOTUNE=1``, or once where another thread's ``clear_cache``
        came since the plan began (see :data:`_BUILDING`): launch with
        ``kernel[grid](...)`` then."""
        if _RECORDING is not None or (runtime.AUTOTUNE and not self.interpreted):
            return None
        keyed = [self.key_names[n] for n, i in enumerate(self._positions)
                 if i < len(args) and args[i] is PER_CALL]  # fmt: skip
        if keyed or any(v is PER_CALL for v in kwargs.values()):
            where = keyed or "a keyword argument"
            raise ValueError(f"{self.name}: PER_CALL stands for a positional argument that "
                             f"is not a key argument; got it for {where}")  # fmt: skip
        since = _building_since()
        config = self._config(args, kwargs)
        if since != _configs.generation():
            # another thread's clear_cache since this plan began: ``grid`` may come from a
            # config before it, this one from after; launched unprepared this once (the
            # launch then takes one config for both), and a plan is begun afresh
            _BUILDING.since = None
            return None
        options = {**runtime.fp_fusion(), **kwargs, **config.all_kwargs(), "grid": grid,
                   "warmup": False}  # fmt: skip
        launch = _direct_launch(self.fn.run, args, options)
        if self.interpreted and runtime.INTERPRETER_LOCK is not None:
            unlocked = launch

            def launch(*pointers):
                # the lock looked up per launch: a forked child has a fresh one, and one
                # captured here could be held forever by a thread the fork left behind
                with runtime.launch_lock():
                    return unlocked(*pointers)

        launch.config = config  # what it runs with (config() may answer another after a clear)
        return launch

    def launcher(self, grid, args, kwargs):
        """(launch(*pointers), prepared): :meth:`prepare`'s launch with the grid
        ``grid(meta)`` of the config a launch takes (``meta``: its block sizes), True; or,
        while launches cannot be prepared, a launch through ``kernel[grid]`` with the same
        arguments, False (for one call: the tuner records it, or the autotuner picks its
        config). Either way the pointers come in the order of the signature."""
        run = self.prepare(grid(self.config(args, kwargs).all_kwargs()), args, kwargs)
        if run is not None:
            return run, True
        return _direct_launch(self[grid], args, kwargs), False

    def launch(self, config: triton.Config, grid, args, kwargs, warmup=False):
        """Launch with an explicit config (what :func:`tune` benchmarks)."""
        options = {**runtime.fp_fusion(), **kwargs, **config.all_kwargs()}
        if callable(grid):
            grid = grid({**dict(zip(self.arg_names, args, strict=False)), **options})
        lock = runtime.INTERPRETER_LOCK
        if self.interpreted and lock is not None:
            with lock:
                return self.fn.run(*args, grid=grid, warmup=warmup, **options)
        return self.fn.run(*args, grid=grid, warmup=warmup, **options)


class _PerCall:
    __slots__ = ()

    def __repr__(self):
        return "PER_CALL"


PER_CALL = _PerCall()
"""Stands, in the arguments of :meth:`TunedKernel.prepare`, for a scalar the prepared launch
takes per call beside the pointers: a value that changes every call (a weight ramped over
training steps) would otherwise prepare, and cache, a launch per value. Triton does not
specialise a kernel on a float's value, so no launch compiles again for a new one."""


def _direct_launch(run, args: tuple, options: dict):
    """``launch(*per_call_values)``: ``run(*args with them in place, **options)`` in one call
    of host code. The per-call values are ``args``' arguments with a ``data_ptr`` and those
    given as :data:`PER_CALL`, in order; the other arguments are kept."""
    where = [i for i, a in enumerate(args) if a is PER_CALL or hasattr(a, "data_ptr")]
    if where == list(range(len(where))):  # pointers first: no reordering
        scalars = args[len(where) :]

        def launch(*pointers):
            return run(*pointers, *scalars, **options)

        return launch
    # one call expression placing the pointers between the scalars
    at = {i: n for n, i in enumerate(where)}
    items = ", ".join(f"p[{at[i]}]" if i in at else f"s[{i}]" for i in range(len(args)))
    scalars = {i: a for i, a in enumerate(args) if i not in at}
    return eval(f"lambda *p: run({items}, **o)", {"s": scalars, "run": run, "o": options})


def tuned(name: str, *, configs, key, sizes, restore_value=None, defaults=None,
          variant_default=None, fits=None):  # fmt: skip
    """Decorator replacing ``triton.autotune``: launches take their config from
    :func:`lookup` (see the module docstring). ``configs`` comes from
    :func:`.runtime.autotune_configs`; ``key`` names the arguments whose values select the
    config (as ``triton.autotune``'s), ``sizes`` those of them that are sizes (nearest
    bucket by log2), the others being variant flags that must match; ``restore_value`` is
    passed to the opt-in autotuner (``VLMKERNELS_AUTOTUNE=1``). ``defaults``: the
    untuned default per input dtype name ("fp32": a config of the space) where it is not
    the first config of the space; ``variant_default``: a function of the key's values by
    name (and "dtype") giving the untuned default of some variants (a config of the space),
    or None for the others; ``fits``: a function of (config, the key's values by name and
    "dtype") saying whether the tuner may pick that config for that variant (configs that
    cannot launch there, e.g. over the shared memory of a block; the inspection checks the
    rest, :func:`vlmkernels.core.inspection.inspect_cases`)."""

    def wrap(fn):
        return TunedKernel(name, fn, configs, key, sizes, restore_value, defaults=defaults,
                           variant_default=variant_default, fits=fits)  # fmt: skip

    return wrap


# Per thread, while a family builds a plan of prepared launches (cache misses only): ``since``,
# the config generation (:func:`.configs.generation`) when the plan began, at its first
# :meth:`TunedKernel.config` or :meth:`TunedKernel.prepare`. A family computes a grid from
# ``config()`` and then prepares the launch, which resolves the config again: another
# thread's ``clear_cache`` in between (new tuned files) would pair a grid of one config with
# a launch of another, and the plan would be stored. ``prepare`` declines then, and a store
# (:class:`_PreparedCache`) keeps no plan begun before a clear; either ends the plan.
_BUILDING = threading.local()


def _building_since() -> int:
    since = getattr(_BUILDING, "since", None)
    if since is None:
        since = _BUILDING.since = _configs.generation()
    return since


# Layouts kept per cache, and keys per kernel's config lookups: a process whose shapes
# change every call (packed sequences of varying total length, prompts of every length)
# would otherwise grow them without end.
PREPARED_LAYOUTS = 1024


class _PreparedCache(_configs.BoundedCache):
    """A :class:`~.configs.BoundedCache` of prepared launches whose ``get`` finds nothing
    while the tuner records launches: a prepared launch bypasses :meth:`TunedKernel.run`,
    so the recording would not see it (and :meth:`TunedKernel.prepare` declines then, so
    nothing is stored either)."""

    def get(self, key, default=None):
        found = None if _RECORDING is not None else dict.get(self, key)
        if found is None:  # a miss: the caller builds a plan now (see _BUILDING)
            _BUILDING.since = None
            return default
        return found

    def __setitem__(self, key, value):
        since = getattr(_BUILDING, "since", None)
        _BUILDING.since = None  # the plan is complete: the next one begins afresh
        if since is not None and since != _configs.generation():
            return  # begun before another thread's clear_cache: it may hold the old configs
        super().__setitem__(key, value)
        if since is not None and since != _configs.generation():  # cleared meanwhile
            self.pop(key, None)


def prepared_cache() -> dict:
    """A dict for a family's prepared launches (:meth:`TunedKernel.prepare`), keyed by
    layout and looked up with ``get``: at most :data:`PREPARED_LAYOUTS` entries (the oldest
    goes first), none found while the tuner records, emptied with the config caches by
    :func:`clear_cache`."""
    return _configs.derived_cache(_PreparedCache(PREPARED_LAYOUTS))


def all_kernels() -> dict[str, TunedKernel]:
    """Every tuned kernel defined so far, by name (``import vlmkernels`` defines them all)."""
    return dict(_REGISTRY)


def _kernel(kernel) -> TunedKernel:
    if isinstance(kernel, TunedKernel):
        return kernel
    known = all_kernels()
    if kernel not in known:
        raise ValueError(f"unknown kernel {kernel!r}; kernels: {', '.join(sorted(known))}")
    return known[kernel]


def lookup(kernel, key: Mapping | None = None, device=None, **key_values) -> triton.Config:
    """The config a CUDA launch of ``kernel`` (a name: "clip_stats", "clip_grad", "siglip",
    "rope") takes for ``key`` on ``device`` (see :func:`device_name`; None: the current
    CUDA device), by the rules of the module docstring. ``key`` (or keyword arguments)
    gives every name of the kernel's key, ``dtype`` as a torch dtype or "bf16" / "fp16" /
    "fp32". (Under Triton's interpreter launches use the interpreter config instead.)"""
    k = _kernel(kernel)
    values = k.key_from_mapping({**(key or {}), **key_values})
    return _resolve(k, device_name(device), values)[0]


def clear_cache() -> None:
    """Forget every cached lookup, loaded file and warning (files are read again, and
    ``VLMKERNELS_CONFIG_DIR`` too, at the next lookup)."""
    _configs.clear()
    _configs._device_name_of_index.cache_clear()
    for k in _REGISTRY.values():
        k._cache.clear()


def lookup_report(device=None) -> dict[str, dict]:
    """Per kernel, where its configs come from on ``device`` (None: the current CUDA
    device), for ``vlmkernels info``. Each value has:

    - ``source``: "user" (a file in the user directory), "package" (a shipped file),
      "default" (neither has a valid entry: the heuristic default config), "interpreter"
      (Triton's interpreter: one config) or "autotune" (``VLMKERNELS_AUTOTUNE=1``);
    - ``device``: the normalised device name (None without a CUDA device);
    - ``path``: the file of ``source`` (None for the others); ``label``: its "source"
      field ("tuned" or "default"); ``buckets``: its number of valid entries;
    - ``files``: every file found, as {"origin", "path", "label", "buckets", "problems"}
      (problems: why entries or the whole file are ignored);
    - ``defaults``: the default config per dtype ("bf16", "fp16", "fp32"), as dicts
      (:meth:`TunedKernel.default_for`); ``variant_defaults``: whether some variants of a
      dtype have another one.
    """
    report = {}
    if device is None and not torch.cuda.is_available():
        dev = None
    else:
        dev = device_name(device)
    for name, k in sorted(all_kernels().items()):
        layers = _layers(k, dev) if dev is not None else []
        files = [
            dict(origin=layer.origin, path=str(layer.path), label=layer.label,
                 buckets=len(layer.entries), problems=list(layer.problems))
            for layer in layers
        ]  # fmt: skip
        used = next((layer for layer in layers if layer.entries), None)
        if k.interpreted:
            source = "interpreter"
        elif runtime.AUTOTUNE:
            source = "autotune"
        else:
            source = used.origin if used is not None else "default"
        in_use = used if source in ("user", "package") else None
        report[name] = dict(
            source=source,
            device=dev,
            path=str(in_use.path) if in_use else None,
            label=in_use.label if in_use else None,
            buckets=len(in_use.entries) if in_use else 0,
            files=files,
            defaults={d: _config_entry(k.default_for(d)) for d in ("bf16", "fp16", "fp32")},
            variant_defaults=k.variant_default is not None,
        )
    return report


@contextlib.contextmanager
def _record():
    """Collects the launches of tuned kernels made inside the block (for the tuner)."""
    global _RECORDING
    previous, calls = _RECORDING, []
    _RECORDING = calls
    try:
        yield calls
    finally:
        _RECORDING = previous
