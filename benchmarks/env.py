"""What a run ran on: versions, device, and the state sampled around each case.

GPU clocks, power, temperature and throttle reasons come from NVML through ``pynvml``
(the ``nvidia-ml-py`` package) when it is importable; clocks are only read, never set.
Without it the clock columns stay empty and ``throttled`` is unknown. The host's 1-minute
load average is sampled too: on a shared CPU it shows when other processes competed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from vlmkernels.cli import device_facts, nvml

REPO_ROOT = Path(__file__).resolve().parent.parent

# NVML clock-event (throttle) reason bits, from nvml.h.
_REASONS = {
    0x1: "gpu_idle",
    0x2: "applications_clocks_setting",
    0x4: "sw_power_cap",
    0x8: "hw_slowdown",
    0x10: "sync_boost",
    0x20: "sw_thermal_slowdown",
    0x40: "hw_thermal_slowdown",
    0x80: "hw_power_brake_slowdown",
    0x100: "display_clock_setting",
}
# Reasons that mean the SM clock was held below what the load asked for.
_SLOWDOWN_MASK = 0x4 | 0x8 | 0x20 | 0x40 | 0x80
_NVML_PERF_POLICY_POWER = 0
_NVML_PERF_POLICY_THERMAL = 1


@dataclass(frozen=True)
class Environment:
    """Per-run facts written on every CSV row."""

    device: str
    device_type: str
    driver: str
    cuda: str
    torch: str
    triton: str
    python: str
    vlmkernels: str
    git_commit: str

    def as_row(self) -> dict[str, str]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def _git_commit() -> str:
    """HEAD of the checkout (``-dirty`` if tracked files changed), else $VLMKERNELS_GIT_COMMIT.

    The device machine gets a copy of the work tree without ``.git``: there the caller can
    pass the commit in the environment variable.
    """
    if shutil.which("git") and (REPO_ROOT / ".git").exists():
        try:
            head = subprocess.run(
                ["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"],
                capture_output=True,
                text=True,
                timeout=10,
                check=True,
            ).stdout.strip()
            dirty = subprocess.run(
                ["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--untracked-files=no"],
                capture_output=True,
                text=True,
                timeout=10,
                check=True,
            ).stdout.strip()
            return head + ("-dirty" if dirty else "")
        except (OSError, subprocess.SubprocessError):
            pass
    return os.environ.get("VLMKERNELS_GIT_COMMIT", "unknown")


def collect(device: torch.device) -> Environment:
    """Versions and device identity for ``device`` (:func:`vlmkernels.cli.device_facts`,
    what ``vlmkernels info`` prints), and the checkout's commit."""
    facts = device_facts(device)
    return Environment(
        device=facts["device"],
        device_type=facts["device_type"],
        driver=facts["driver"],
        cuda=facts["cuda"],
        torch=facts["torch"],
        triton=facts["triton"],
        python=facts["python"],
        vlmkernels=facts["vlmkernels"],
        git_commit=_git_commit(),
    )


SAMPLE_COLUMNS = (
    "sm_clock_mhz",
    "mem_clock_mhz",
    "power_w",
    "temp_c",
    "throttle_reasons",
    "load1",
)


def _load1() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def _reason_names(bits: int) -> str:
    return "|".join(name for bit, name in _REASONS.items() if bits & bit) or "none"


class GpuMonitor:
    """Reads SM/memory clocks, power, temperature and throttle reasons of one GPU via NVML.

    ``sample()`` returns a dict keyed by :data:`SAMPLE_COLUMNS` (only ``load1`` without
    NVML), plus the private cumulative power/thermal violation times used by
    :meth:`throttled`.
    """

    def __init__(self, device: torch.device):
        self.nvml = nvml() if device.type == "cuda" else None
        self.handle = None
        if self.nvml is None:
            return
        try:
            uuid = str(torch.cuda.get_device_properties(device).uuid)
            self.handle = self.nvml.nvmlDeviceGetHandleByUUID(
                uuid if uuid.startswith("GPU-") else "GPU-" + uuid
            )
        except Exception:
            try:
                index = device.index if device.index is not None else torch.cuda.current_device()
                self.handle = self.nvml.nvmlDeviceGetHandleByIndex(index)
            except Exception:
                self.handle = None

    @property
    def available(self) -> bool:
        return self.handle is not None

    def _read(self, fn_names, *args):
        for fn_name in fn_names:
            fn = getattr(self.nvml, fn_name, None)
            if fn is None:
                continue
            try:
                return fn(self.handle, *args)
            except Exception:
                return None
        return None

    def sample(self) -> dict:
        out: dict = {"load1": _load1()}
        if not self.available:
            return out
        nv = self.nvml
        out |= {
            "sm_clock_mhz": self._read(["nvmlDeviceGetClockInfo"], nv.NVML_CLOCK_SM),
            "mem_clock_mhz": self._read(["nvmlDeviceGetClockInfo"], nv.NVML_CLOCK_MEM),
            "temp_c": self._read(["nvmlDeviceGetTemperature"], nv.NVML_TEMPERATURE_GPU),
        }
        milliwatts = self._read(["nvmlDeviceGetPowerUsage"])
        out["power_w"] = None if milliwatts is None else milliwatts / 1000.0
        bits = self._read(
            ["nvmlDeviceGetCurrentClocksEventReasons", "nvmlDeviceGetCurrentClocksThrottleReasons"]
        )
        out["_reason_bits"] = bits
        out["throttle_reasons"] = None if bits is None else _reason_names(bits)
        for key, policy in (
            ("_power_violation_ns", _NVML_PERF_POLICY_POWER),
            ("_thermal_violation_ns", _NVML_PERF_POLICY_THERMAL),
        ):
            status = self._read(["nvmlDeviceGetViolationStatus"], policy)
            out[key] = None if status is None else int(status.violationTime)
        return out

    @staticmethod
    def throttled(before: dict, after: dict) -> str:
        """``"yes"`` if a slowdown reason was set at either sample or the power/thermal
        violation counters advanced between them; ``"no"``; ``""`` when unknown."""
        bits = [s.get("_reason_bits") for s in (before, after)]
        if any(b is not None and b & _SLOWDOWN_MASK for b in bits):
            return "yes"
        for key in ("_power_violation_ns", "_thermal_violation_ns"):
            a, b = before.get(key), after.get(key)
            if a is not None and b is not None and b > a:
                return "yes"
        if all(b is None for b in bits):
            return ""
        return "no"


def describe(env: Environment) -> str:
    """One line for the console."""
    return (
        f"device: {env.device} | driver {env.driver or '-'} | CUDA {env.cuda or '-'} | "
        f"torch {env.torch} | triton {env.triton} | python {env.python} | "
        f"vlmkernels {env.vlmkernels} ({env.git_commit}) | {sys.platform}"
    )
