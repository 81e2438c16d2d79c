"""GPU utilisation, memory and power for the training log (NVML)."""
from __future__ import annotations

import warnings

import pynvml
import torch

from pdml.backends.registry import device_index


class GpuTelemetry:
    """Utilisation, memory and power of the run's GPU through nvidia-ml-py (NVML).

    ``sample() -> dict`` (empty on CPU, or when NVML cannot be loaded)."""

    def __init__(self, device: torch.device):
        self._handle = None
        if device.type != "cuda":
            return
        try:
            pynvml.nvmlInit()
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(device_index(device))
            self._nvml = pynvml
        except Exception as e:  # no driver library, no permission: training goes on
            warnings.warn(f"GPU telemetry off: NVML unavailable ({e})")

    def sample(self) -> dict:
        if self._handle is None:
            return {}
        nv = self._nvml
        out = {}
        try:
            out["gpu_util_pct"] = float(nv.nvmlDeviceGetUtilizationRates(self._handle).gpu)
            out["gpu_mem_used_mib"] = nv.nvmlDeviceGetMemoryInfo(self._handle).used / 2**20
            out["gpu_power_w"] = nv.nvmlDeviceGetPowerUsage(self._handle) / 1000.0
        except Exception:  # a counter the GPU does not expose
            pass
        return out
