r"""Launch configs of the Triton kernels: the files, per device, and the lookup rules
(:mod:`.tuning` launches with them; :mod:`.tuner`, ``vlmkernels tune``, writes them).

Kernels. Each family's Triton kernels (declared in its ``family.py``) take a launch config
(tile sizes as constexprs, ``num_warps``, ``num_stages``) from a config space defined next
to them; each is decorated with :func:`tuned`, which replaces ``triton.autotune``.

Key. A kernel's key is its autotuning key (argument values: sizes such as ``D`` and
``n_bucket`` = the next power of two of the larger block side, and the constexpr flags that
select its variant, such as ``ROWS`` or ``WRITE_GRAD``), plus ``dtype``, the element type
of its first tensor argument ("bf16", "fp16", "fp32"). Booleans are stored as 0 / 1. For
example ``rope``: sizes ``HQ, HK, D, half``, variant ``SOURCE`` (0 table, 1 positions).

Files. One JSON file per kernel and device, ``<dir>/<device>/<kernel>.json``. ``<device>``
is the normalised CUDA device name (:func:`normalise_device_name`: every run of characters
other than letters, digits and dots becomes one underscore, so "NVIDIA H100 80GB HBM3" is
"NVIDIA_H100_80GB_HBM3" and "NVIDIA H100-PCIe" is "NVIDIA_H100_PCIe"). Values below are
illustrative::

    {
      "format": 1,
      "kernel": "clip_stats",
      "device": "NVIDIA_H100_80GB_HBM3",
      "source": "tuned",
      "triton_version": "3.6.0",
      "source_hash": "<16 hex digits>",
      "key": ["D", "n_bucket", "ROWS", "COLS", "IDS", "SMOOTH", "TEACHER", "dtype"],
      "configs": {
        "D=768,n_bucket=32768,ROWS=1,COLS=1,IDS=0,SMOOTH=0,TEACHER=0,dtype=bf16":
          {"BM": 128, "BN": 128, "BK": 64, "num_warps": 8, "num_stages": 3,
           "ms": 1.25, "default_ms": 1.31}
      }
    }

- ``source``: "tuned" (measured by the tuner) or "default" (hand-written heuristic
  values, not measured); both are used the same way, :func:`lookup_report` shows which.
- ``triton_version`` and ``source_hash`` (:meth:`TunedKernel.source_hash`: SHA-256 of the
  source of the kernel and of the ``@triton.jit`` helpers it calls, from ``def`` on, so
  moving code or editing decorators does not change it) make a file stale when the running
  Triton's major.minor version differs or the kernel's code changed; a stale file is
  ignored as a whole with a :class:`StaleConfigWarning` (once per file). So is a file whose
  ``kernel`` or ``key`` differs from the kernel's.
- ``configs`` maps buckets ("name=value" pairs in ``key`` order, comma-separated) to a
  config: the kernel's constexprs, ``num_warps``, ``num_stages``; ``ms`` and ``default_ms``
  (the winner's and the default config's time, median ms, from :func:`tune`) are
  informative. An entry that is not one of the kernel's configs (the space changed) is
  ignored with a :class:`StaleConfigWarning`: the launchers size buffers for that space.
- Malformed files and entries are ignored the same way, with a
  :class:`MalformedConfigWarning` (a :class:`StaleConfigWarning`) naming the file and what
  is wrong, once per file: a file that does not parse (not JSON, not UTF-8, nested too
  deeply) or is not a JSON object, ``configs`` that is not an object; an entry whose value
  is not an object, whose launch options are not integers, or whose bucket does not follow
  ``key``. The other entries of the file still count, and the lookup goes on to the next
  file, then to the default.

Lookup, for a kernel, a device and a key:

1. the user directory ``VLMKERNELS_CONFIG_DIR`` (default ``$XDG_CACHE_HOME/vlmkernels/
   configs``, else ``~/.cache/vlmkernels/configs``: where :func:`tune` writes), then the
   files shipped in the package (``vlmkernels/configs/``). The first of these two files
   that holds a valid entry of the same variant decides;
2. in that file, "nearest bucket": among the entries whose variant values (every key but
   the sizes: flags and dtype) equal the key's, the exact bucket if present, else the one
   minimising the sum over the size keys of ``|log2(entry size) - log2(size)|`` (ties: the
   larger sizes). Entries of another variant or dtype are never used (a config tuned
   without the teacher's second product, or for 16-bit tiles, may not fit);
3. otherwise the heuristic default of the dtype and variant (``TunedKernel.default_for``:
   the kernel's variant rule, else its dtype's default, else the first config of the
   space), with a :class:`DefaultConfigWarning` once per device in the process (the first
   kernel it happens to; ``vlmkernels info`` lists them all).

Results are cached per (kernel, device, key); files (and ``VLMKERNELS_CONFIG_DIR``) are read
once; :func:`clear_cache` forgets everything.

Preferred backend. ``<dir>/<device>/backends.json`` records, per op name (as passed to
``resolve_backend``: "rope", "clip_loss", "siglip_loss"), which backend is faster on that
device::

    {"format": 1, "device": "NVIDIA_H100_80GB_HBM3",
     "backends": {"rope": {"backend": "cuda", "triton_ms": 2.1, "cuda_ms": 1.9}}}

:func:`preferred_backend` reads it (user directory first, then the package);
``resolve_backend`` runs CUDA tensors on the recorded backend when it is available, else on
Triton. :func:`tune` measures and records it for the ops with a CUDA C++ implementation
when the extension is built; :func:`record_preferred_backend` writes an entry. A
``backends.json`` that does not parse, whose ``backends`` is not an object, or an entry
whose backend is not "triton" or "cuda", is ignored (the file or that entry) with a
:class:`MalformedConfigWarning`, once per file; the lookup goes on to the next file.

Preferred design. ``<dir>/<device>/designs.json`` records, per design choice of a family
(``"clip_backward"``: the contrastive family's CLIP backward, "chunked" or "fused"), which
design :func:`vlmkernels.core.tuner.tune` measured faster on that device::

    {"format": 1, "device": "NVIDIA_H100_80GB_HBM3",
     "designs": {"clip_backward": {"design": "chunked", "chunked_ms": 6.1, "fused_ms": 9.0}}}

:func:`preferred_design` reads it (user directory, then the package; malformed files and
entries are ignored with a :class:`MalformedConfigWarning`); the family validates the name
and decides what an explicit choice (an argument, an environment variable) overrides.

Shipped files. ``vlmkernels/configs/<device>/*.json`` are installed with the package; they
come from ``vlmkernels tune --out vlmkernels/configs`` on the GPU. None are shipped yet.

API: :func:`lookup`, :func:`lookup_report`, :func:`preferred_backend`,
:func:`record_preferred_backend`, :func:`preferred_design`, :func:`record_preferred_design`,
:func:`clear_cache`, :func:`normalise_device_name`; tuning
itself is :func:`vlmkernels.core.tuner.tune`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import pathlib
import re
import tempfile
from collections.abc import Callable, Mapping
from typing import Any

import torch
import triton

from .files import write_json
from .runtime import warn

FORMAT = 1
CONFIG_DIR_ENV = "VLMKERNELS_CONFIG_DIR"
PACKAGE_CONFIG_DIR = pathlib.Path(__file__).resolve().parents[1] / "configs"
BACKENDS_FILE = "backends.json"
DESIGNS_FILE = "designs.json"
_META = ("ms", "default_ms")  # informative entry fields, not launch options
_LAUNCH_OPTIONS = ("num_warps", "num_stages")
_DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


class ConfigWarning(UserWarning):
    """Base class of the warnings about launch configs."""


class DefaultConfigWarning(ConfigWarning):
    """A kernel launches with its heuristic default config: no tuned entry applies."""


class StaleConfigWarning(ConfigWarning):
    """A config file (or entry) is ignored: other Triton version, changed kernel source,
    a config outside the kernel's space, or a malformed file (the subclass
    :class:`MalformedConfigWarning`)."""


class MalformedConfigWarning(StaleConfigWarning):
    """A config or ``backends.json`` file (or one of its entries) is ignored because it is
    not what the format says: not JSON, nested too deeply, or values of the wrong type."""


# --------------------------------------------------------------------------------------
# Devices and directories
# --------------------------------------------------------------------------------------


def normalise_device_name(name: str) -> str:
    """File-system-safe device name: runs of characters other than letters, digits and dots
    become one underscore ("NVIDIA H100 80GB HBM3" -> "NVIDIA_H100_80GB_HBM3")."""
    return re.sub(r"[^A-Za-z0-9.]+", "_", str(name).strip()).strip("_")


def _raw_device_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


def _current_device() -> int:
    return torch.cuda.current_device()


@functools.cache
def _device_name_of_index(index: int) -> str:
    return normalise_device_name(_raw_device_name(index))


def _device_token(device) -> int | str:
    """A CUDA device index, or a normalised device name when ``device`` is a name."""
    if device is None:
        return _current_device()
    if isinstance(device, int):
        return device
    if isinstance(device, str) and not re.fullmatch(r"cuda(:\d+)?", device):
        return normalise_device_name(device)
    device = torch.device(device)
    if device.type != "cuda":
        raise ValueError(f"no tuned configs for {device}: configs are per CUDA device")
    return device.index if device.index is not None else _current_device()


def device_name(device=None) -> str:
    """Normalised name of ``device``: None (the current CUDA device), an index, a
    ``torch.device`` or "cuda[:i]", or a device name ("NVIDIA H100 80GB HBM3")."""
    token = _device_token(device)
    return _device_name_of_index(token) if isinstance(token, int) else token


def user_config_dir() -> pathlib.Path:
    """``VLMKERNELS_CONFIG_DIR``, else ``$XDG_CACHE_HOME/vlmkernels/configs``, else
    ``~/.cache/vlmkernels/configs``."""
    env = os.environ.get(CONFIG_DIR_ENV, "").strip()
    if env:
        return pathlib.Path(env).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME", "").strip()
    base = pathlib.Path(cache).expanduser() if cache else pathlib.Path.home() / ".cache"
    return base / "vlmkernels" / "configs"


def unwritable_folder(path) -> str | None:
    """Why no file can be written in the folder ``path`` (created if missing): "is a
    file", a parent that is a file, no permission; None when one can."""
    path = pathlib.Path(path)
    if path.exists() and not path.is_dir():
        return "is a file, expected a folder"
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        return f"cannot write there ({exc.strerror or type(exc).__name__})"
    return None


def _search_dirs() -> list[tuple[str, pathlib.Path]]:
    return [("user", user_config_dir()), ("package", PACKAGE_CONFIG_DIR)]


def _triton_minor(version: str) -> tuple[int, ...] | None:
    m = re.match(r"(\d+)\.(\d+)", str(version))
    return (int(m.group(1)), int(m.group(2))) if m else None


def _dtype_name(dtype) -> str:
    if isinstance(dtype, str):
        return dtype
    return _DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))


def _key_value(value):
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    if isinstance(value, torch.dtype):
        return _dtype_name(value)
    return str(value)


def _config_signature(cfg: triton.Config) -> tuple:
    return (tuple(sorted(cfg.kwargs.items())), cfg.num_warps, cfg.num_stages)


def _config_entry(cfg: triton.Config) -> dict:
    return {**cfg.kwargs, "num_warps": cfg.num_warps, "num_stages": cfg.num_stages}


# --------------------------------------------------------------------------------------
# Files and lookup
# --------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Layer:
    origin: str  # "user" or "package"
    path: pathlib.Path
    label: str  # the file's "source": "tuned" or "default"
    entries: dict[tuple, triton.Config]
    problems: list[str]


_LAYERS: dict[tuple[str, str], list[_Layer]] = {}
_WARNED_STALE: set[str] = set()
_WARNED_DEFAULT: set[str] = set()  # devices


def _parse_bucket(kernel, text: str) -> tuple:
    """The key of a bucket string; ValueError when it is not the kernel's name=value pairs."""
    parts = [part.partition("=") for part in str(text).split(",")]
    names = [name for name, _, _ in parts]
    if any(not sep for _, sep, _ in parts) or names != kernel.file_key:
        raise ValueError(f"bucket {text!r} does not follow the key {kernel.file_key}")
    sizes = [parts[i][2] for i in kernel.size_index]
    if not all(re.fullmatch(r"\d+", v) for v in sizes):
        raise ValueError(f"bucket {text!r}: a size is not a non-negative integer")
    return tuple(int(v) if re.fullmatch(r"-?\d+", v) else v for _, _, v in parts)


def _parse_json(path: pathlib.Path) -> tuple[dict | None, str]:
    """(the JSON object in ``path``, "") or (None, what is wrong with the file)."""
    try:
        doc = json.loads(path.read_text())
    except OSError as exc:
        return None, f"it cannot be read ({type(exc).__name__}: {exc})"
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        return None, f"it does not parse ({type(exc).__name__}: {exc})"
    except RecursionError:
        return None, "it does not parse (JSON nested too deeply)"
    if not isinstance(doc, dict):
        return None, f"it is a JSON {type(doc).__name__}, not an object"
    return doc, ""


def _entry(kernel, text: str, entry) -> tuple[tuple, triton.Config]:
    """(key, config) of one ``configs`` entry; ValueError saying what is wrong with it."""
    if not isinstance(entry, dict):
        raise ValueError(f"entry {text}: {entry!r} is not an object of launch options")
    options = {k: v for k, v in entry.items() if k not in _META}
    odd = [f"{k}={v!r}" for k, v in options.items() if type(v) is not int]
    if odd:
        what = "is not an integer" if len(odd) == 1 else "are not integers"
        raise ValueError(f"entry {text}: {', '.join(odd)} {what}")
    kw = {k: v for k, v in options.items() if k not in _LAUNCH_OPTIONS}
    sig = (tuple(sorted(kw.items())), options.get("num_warps"), options.get("num_stages"))
    config = kernel._by_signature.get(sig)
    if config is None:
        raise ValueError(f"entry {text}: {options} is not in the config space")
    return _parse_bucket(kernel, text), config


def _valid_entries(kernel, doc: dict) -> tuple[dict, list[str]]:
    """({bucket text: entry} of the valid ``configs`` entries of a current file, problems)."""
    configs = doc.get("configs", {})
    if not isinstance(configs, dict):
        return {}, [f"'configs' is a JSON {type(configs).__name__}, not an object"]
    valid, problems = {}, []
    for text, entry in configs.items():
        try:
            _entry(kernel, text, entry)
        except ValueError as exc:
            problems.append(str(exc))
            continue
        valid[text] = entry
    return valid, problems


def _stale_reasons(kernel, doc: dict) -> list[str]:
    reasons = []
    if doc.get("kernel") != kernel.name:
        reasons.append(f"it is for kernel {doc.get('kernel')!r}, not {kernel.name!r}")
    if doc.get("key") != kernel.file_key:
        reasons.append(f"its key {doc.get('key')} is not the kernel's {kernel.file_key}")
    if _triton_minor(doc.get("triton_version", "")) != _triton_minor(triton.__version__):
        reasons.append(
            f"it was tuned with triton {doc.get('triton_version')} (running {triton.__version__})"
        )
    if doc.get("source_hash") != kernel.source_hash:
        reasons.append(
            f"the kernel's source changed (hash {doc.get('source_hash')}, now {kernel.source_hash})"
        )
    return reasons


def _warn_once(path: pathlib.Path, problems: list[str], partial: bool, category) -> None:
    """One warning per file (until :func:`clear_cache`) listing up to three problems. The
    file counts as warned once the warning is issued: one a filter raises as an error is
    raised again at the next lookup, as that lookup did not run."""
    if not problems or str(path) in _WARNED_STALE:
        return
    what = "entries of " if partial else ""
    warn(
        f"vlmkernels: ignoring {what}{path}: {'; '.join(problems[:3])}"
        f"{' ...' if len(problems) > 3 else ''}. Re-run `vlmkernels tune` on this GPU.",
        category,
    )
    _WARNED_STALE.add(str(path))


def _load_layer(kernel, origin: str, path: pathlib.Path) -> _Layer | None:
    if not path.is_file():
        return None
    entries: dict[tuple, triton.Config] = {}
    doc, problem = _parse_json(path)
    if doc is None:
        _warn_once(path, [problem], False, MalformedConfigWarning)
        return _Layer(origin, path, "?", entries, [problem])
    label = str(doc.get("source", "?"))
    problems = _stale_reasons(kernel, doc)
    if problems:
        _warn_once(path, problems, False, StaleConfigWarning)
        return _Layer(origin, path, label, entries, problems)
    valid, problems = _valid_entries(kernel, doc)
    for text, entry in valid.items():
        key, config = _entry(kernel, text, entry)
        entries[key] = config
    # an entry outside the space is stale (the space changed); any other problem, malformed
    malformed = any("not in the config space" not in p for p in problems)
    _warn_once(path, problems, bool(entries),
               MalformedConfigWarning if malformed else StaleConfigWarning)  # fmt: skip
    return _Layer(origin, path, label, entries, problems)


def _layers(kernel, device: str) -> list[_Layer]:
    cached = _LAYERS.get((kernel.name, device))
    if cached is None:
        since = _GENERATION
        cached = []
        for origin, root in _search_dirs():
            layer = _load_layer(kernel, origin, root / device / f"{kernel.name}.json")
            if layer is not None:
                cached.append(layer)
        store(_LAYERS, (kernel.name, device), cached, since)
    return cached


def _nearest(kernel, entries: Mapping[tuple, Any], key: tuple):
    """The entry of ``entries`` for ``key``: exact, else the nearest bucket of the same
    variant (sum of |log2| distances of the sizes; ties to the larger sizes), else None."""
    if key in entries:
        return entries[key]
    same = [k for k in entries if all(k[i] == key[i] for i in kernel.variant_index)]
    if not same:
        return None

    def log2(v):
        return math.log2(max(int(v), 1))

    def rank(k):
        dist = sum(abs(log2(k[i]) - log2(key[i])) for i in kernel.size_index)
        return (dist, tuple(-int(k[i]) for i in kernel.size_index))

    return entries[min(same, key=rank)]


_DERIVED: list[dict] = []  # caches of what was derived from the files (launches, backends)

# Bumped by :func:`clear` (and by recording a choice) before the caches are emptied. A value
# read from the files before a bump may be stale, e.g. read by a serving thread while
# another one wrote the tuner's results: :func:`store` does not keep it.
_GENERATION = 0


def generation() -> int:
    """The count of :func:`clear` calls so far: read before computing a value to cache."""
    return _GENERATION


def store(cache: dict, key, value, since: int):
    """``value``, stored as ``cache[key]`` unless the caches were emptied since the
    :func:`generation` ``since`` (read before ``value`` was computed): another thread's
    clear must not be undone by a value computed from the files it replaced. Only on a
    cache miss; the lookups stay plain dict lookups."""
    if since == _GENERATION:
        cache[key] = value
        if since != _GENERATION:  # emptied between the check and the store
            cache.pop(key, None)
    return value


class BoundedCache(dict):
    """A dict of at most ``limit`` entries: storing one more drops the oldest. Lookups are
    plain dict lookups. Threads storing at once (a server calling ops from several) may
    each drop an entry, never fail: the oldest may be gone, or the dict changing, by the
    time one thread drops it. Two threads dropping the same oldest entry leave one entry
    too many: a store drops entries until there is room, so the excess goes at the next
    store instead of adding up."""

    def __init__(self, limit: int):
        super().__init__()
        self.limit = limit

    def __setitem__(self, key, value):
        if key not in self:
            while len(self) >= self.limit:
                try:
                    self.pop(next(iter(self)), None)
                except (StopIteration, RuntimeError):  # emptied / changed by another thread
                    pass
        super().__setitem__(key, value)


def derived_cache(cache: dict | None = None) -> dict:
    """A dict (``cache``, default a new one) for values derived from the config files
    (prepared launches, default backends), emptied whenever the files may have changed
    (:func:`clear`, and recording a preferred backend)."""
    cache = {} if cache is None else cache
    _DERIVED.append(cache)
    return cache


def clear() -> None:
    """Forget the loaded files, the warnings given, the recorded backends and every
    :func:`derived_cache`."""
    global _GENERATION
    _GENERATION += 1  # first: a value being computed now is not stored (see store)
    _LAYERS.clear()
    _WARNED_STALE.clear()
    _WARNED_DEFAULT.clear()
    _BACKENDS.clear()
    _DESIGNS.clear()
    for cache in _DERIVED:
        cache.clear()


def _resolve(kernel, device: str, key: tuple):
    """(config, origin) for a key on a device; origin "user", "package" or "default"."""
    for layer in _layers(kernel, device):
        config = _nearest(kernel, layer.entries, key)
        if config is not None:
            return config, layer.origin
    default = kernel.default_for(key[-1], dict(zip(kernel.file_key, key, strict=True)))
    if device not in _WARNED_DEFAULT:  # marked once issued (see _warn_once)
        warn(
            f"vlmkernels: no tuned config for the Triton kernel {kernel.name!r} on {device} "
            f"({kernel.bucket(key)}); launching with the default "
            f"{_config_entry(default)}. The other kernels without one on this device take "
            f"their defaults without another warning (`vlmkernels info` lists each "
            f"kernel's source). Run `vlmkernels tune` on this GPU (files go to "
            f"{user_config_dir()}). Warned once per device.",
            DefaultConfigWarning,
        )
        _WARNED_DEFAULT.add(device)
    return default, "default"


# --------------------------------------------------------------------------------------
# Preferred backend
# --------------------------------------------------------------------------------------

_BACKENDS: dict[tuple[str, Any], str | None] = {}
_DESIGNS: dict[tuple[str, Any], str | None] = {}


def _backend_entries(doc: dict) -> tuple[dict[str, dict], list[str]]:
    """({op: entry} of the valid entries of a backends.json document, problems). An entry
    is {"backend": "triton" | "cuda", measurements...} (or that name alone)."""
    raw = doc.get("backends", {})
    if not isinstance(raw, dict):
        return {}, [f"'backends' is a JSON {type(raw).__name__}, not an object of op: entry"]
    valid, problems = {}, []
    for op, entry in raw.items():
        backend = entry.get("backend") if isinstance(entry, dict) else entry
        if isinstance(backend, str) and backend in ("triton", "cuda"):
            valid[op] = entry if isinstance(entry, dict) else {"backend": backend}
        else:
            problems.append(f"entry {op!r}: backend {backend!r} is not 'triton' or 'cuda'")
    return valid, problems


def _read_backends(path: pathlib.Path) -> dict[str, dict]:
    """The valid entries of the backends.json at ``path`` ({} when there is none); the
    problems of a malformed file or entry are warned once per file."""
    if not path.is_file():
        return {}
    doc, problem = _parse_json(path)
    if doc is None:
        _warn_once(path, [problem], False, MalformedConfigWarning)
        return {}
    valid, problems = _backend_entries(doc)
    _warn_once(path, problems, bool(valid), MalformedConfigWarning)
    return valid


def _recorded_backend(op: str, device: str) -> str | None:
    for _, root in _search_dirs():
        entry = _read_backends(root / device / BACKENDS_FILE).get(op)
        if entry is not None:
            return entry["backend"]
    return None


def preferred_backend(op: str, device=None) -> str | None:
    """The backend ("triton" or "cuda") recorded as faster for ``op`` on ``device`` (see
    :func:`device_name`), from ``backends.json`` in the user directory, then the package;
    None when none is recorded. Cached per (op, device)."""
    token = _device_token(device)
    cache_key = (op, token)
    try:
        return _BACKENDS[cache_key]
    except KeyError:  # (not a membership test and a lookup: a clear may come in between)
        pass
    since = _GENERATION
    name = _device_name_of_index(token) if isinstance(token, int) else token
    return store(_BACKENDS, cache_key, _recorded_backend(op, name), since)


def record_preferred_backend(op: str, backend: str, device=None, out_dir=None,
                             **measurements) -> pathlib.Path:  # fmt: skip
    """Record ``backend`` ("triton" or "cuda") as the faster for ``op`` on ``device`` in
    ``<out_dir>/<device>/backends.json`` (default: the user directory), with any
    measurements (e.g. ``triton_ms=..., cuda_ms=...``); returns the file."""
    if backend not in ("triton", "cuda"):
        raise ValueError(f"backend must be 'triton' or 'cuda'; got {backend!r}")
    entry = {"backend": backend, **measurements}
    return _record(BACKENDS_FILE, "backends", _read_backends, op, entry, device, out_dir)


def _record(file_name: str, section: str, read: Callable, name: str, entry: dict, device,
            out_dir) -> pathlib.Path:  # fmt: skip
    """Writes ``entry`` as ``name`` of ``section`` in ``<out_dir>/<device>/<file_name>``,
    keeping the file's other valid entries (``read(path)``), and forgets the cached
    choices; returns the file."""
    dev = device_name(device)
    path = pathlib.Path(out_dir or user_config_dir()) / dev / file_name
    doc = {"format": FORMAT, "device": dev, section: read(path)}
    doc[section][name] = entry
    write_json(path, doc)
    global _GENERATION
    _GENERATION += 1  # first: a choice being read now is not stored (see store)
    _BACKENDS.clear()
    _DESIGNS.clear()
    for cache in _DERIVED:
        cache.clear()
    return path


def _read_designs(path: pathlib.Path) -> dict[str, dict]:
    """The valid entries ({choice: {"design": name, measurements...}}) of the designs.json
    at ``path`` ({} when there is none); problems are warned once per file."""
    if not path.is_file():
        return {}
    doc, problem = _parse_json(path)
    if doc is None:
        _warn_once(path, [problem], False, MalformedConfigWarning)
        return {}
    raw = doc.get("designs", {})
    if not isinstance(raw, dict):
        problem = f"'designs' is a JSON {type(raw).__name__}, not an object of choice: entry"
        _warn_once(path, [problem], False, MalformedConfigWarning)
        return {}
    valid, problems = {}, []
    for choice, entry in raw.items():
        design = entry.get("design") if isinstance(entry, dict) else None
        if isinstance(design, str) and design:
            valid[choice] = entry
        else:
            problems.append(f"entry {choice!r}: no design name")
    _warn_once(path, problems, bool(valid), MalformedConfigWarning)
    return valid


def preferred_design(choice: str, device=None, known=None) -> str | None:
    """The design recorded as faster for ``choice`` on ``device`` (see :func:`device_name`),
    from ``designs.json`` in the user directory, then the package; None when none is
    recorded. A name not in ``known`` (the designs this vlmkernels has; a file written by
    another version) is ignored with a :class:`MalformedConfigWarning`. Cached per
    (choice, device, known)."""
    token = _device_token(device)
    cache_key = (choice, token, None if known is None else tuple(known))
    try:
        return _DESIGNS[cache_key]
    except KeyError:
        pass
    since = _GENERATION
    name = _device_name_of_index(token) if isinstance(token, int) else token
    found = None
    for _, root in _search_dirs():
        path = root / name / DESIGNS_FILE
        entry = _read_designs(path).get(choice)
        if entry is None:
            continue
        if known is not None and entry["design"] not in known:
            problem = (f"entry {choice!r}: design {entry['design']!r} is not one of "
                       f"{', '.join(known)}")  # fmt: skip
            _warn_once(path, [problem], True, MalformedConfigWarning)
            continue
        found = entry["design"]
        break
    return store(_DESIGNS, cache_key, found, since)


def record_preferred_design(choice: str, design: str, device=None, out_dir=None,
                            **measurements) -> pathlib.Path:  # fmt: skip
    """Record ``design`` as the faster for ``choice`` on ``device`` in
    ``<out_dir>/<device>/designs.json`` (default: the user directory), with any
    measurements (e.g. ``chunked_ms=..., fused_ms=...``); returns the file."""
    if not isinstance(design, str) or not design:
        raise ValueError(f"design must be a non-empty name; got {design!r}")
    entry = {"design": design, **measurements}
    return _record(DESIGNS_FILE, "designs", _read_designs, choice, entry, device, out_dir)


# --------------------------------------------------------------------------------------
# Writing files, recording launches (for the tuner)
# --------------------------------------------------------------------------------------


def torch_dtype(name) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    table = {v: k for k, v in _DTYPE_NAMES.items()}
    if name not in table:
        raise ValueError(f"dtype must be one of {sorted(table)}; got {name!r}")
    return table[name]


def _write_winners(kernel, device: str, winners: Mapping[tuple, dict],
                   out_dir: pathlib.Path, log: Callable = print) -> pathlib.Path:  # fmt: skip
    """Merge ``winners`` into ``<out_dir>/<device>/<kernel>.json``: the valid entries of a
    current file (same kernel, key, triton major.minor and source hash) are kept unless
    re-tuned; a stale or malformed file, and malformed entries, are replaced."""
    path = out_dir / device / f"{kernel.name}.json"
    old, problem = _parse_json(path) if path.is_file() else (None, "")
    configs: dict[str, dict] = {}
    if problem:
        log(f"replacing {path}: {problem}")
    if old is not None:
        reasons = _stale_reasons(kernel, old)
        if reasons:
            log(f"replacing {path}: {'; '.join(reasons)}")
        else:
            configs, problems = _valid_entries(kernel, old)
            for p in problems:
                log(f"dropping from {path}: {p}")
    configs.update({kernel.bucket(key): entry for key, entry in winners.items()})

    def order(text):
        key = _parse_bucket(kernel, text)
        return tuple((0, v, "") if isinstance(v, int) else (1, 0, v) for v in key)

    doc = {
        "format": FORMAT,
        "kernel": kernel.name,
        "device": device,
        "source": "tuned",
        "triton_version": triton.__version__,
        "torch_version": torch.__version__.split("+")[0],
        "source_hash": kernel.source_hash,
        "key": kernel.file_key,
        "configs": {text: configs[text] for text in sorted(configs, key=order)},
    }
    write_json(path, doc)
    return path
