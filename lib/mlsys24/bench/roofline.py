"""Roofline arithmetic: bytes and FLOPs over time, as rates and as a share of the device's peak.

Peaks are datasheet numbers (dense, no sparsity) of the SXM parts; the measured ceilings of
``../shared/anchors`` are lower (an H100 copies at ~3.0 TB/s of its 3.35 TB/s). ``roofline``
reports both the achieved rates and which resource bounds the operation.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

__all__ = ["DevicePeaks", "PEAKS", "device_peaks", "roofline", "attainable_seconds"]


@dataclass(frozen=True)
class DevicePeaks:
    name: str
    hbm_GBps: float          # memory bandwidth, GB/s (1e9)
    fp16_TFLOPs: float       # dense fp16/bf16 tensor-core rate
    fp32_TFLOPs: float       # non-tensor fp32 rate
    int8_TOPs: float         # dense int8 tensor-core rate
    l2_MB: float
    source: str

    @property
    def ridge_flops_per_byte(self) -> float:
        """Arithmetic intensity above which fp16 matrix work is compute-bound."""
        return self.fp16_TFLOPs * 1e12 / (self.hbm_GBps * 1e9)


PEAKS: dict[str, DevicePeaks] = {
    "H100": DevicePeaks("NVIDIA H100 SXM5 80GB", 3350, 989.4, 66.9, 1978.9, 50,
                        "NVIDIA H100 datasheet (SXM5, dense)"),
    "H200": DevicePeaks("NVIDIA H200 SXM 141GB", 4800, 989.4, 66.9, 1978.9, 60,
                        "NVIDIA H200 datasheet (SXM, dense)"),
    "A100": DevicePeaks("NVIDIA A100 SXM4 80GB", 2039, 312.0, 19.5, 624.0, 40,
                        "NVIDIA A100 datasheet (SXM4 80GB, dense)"),
    # A rough estimate for a 2-core x86 server with AVX2/AVX-512: 2 cores x ~3 GHz x 32 fp32
    # FLOP/cycle, DRAM share ~20 GB/s. Only used to put CPU numbers on an axis, never as a claim.
    "CPU": DevicePeaks("CPU (estimate)", 20, 0.2, 0.2, 0.4, 0, "rough estimate, see roofline.py"),
}


def device_peaks(device_name: str | None = None) -> DevicePeaks:
    """Peaks for a device name as torch reports it (e.g. 'NVIDIA H100 80GB HBM3').

    ``None`` means the current CUDA device, else the CPU estimate.
    """
    if device_name is None:
        try:
            import torch
            device_name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
        except Exception:
            device_name = "cpu"
    up = device_name.upper()
    for key in ("H200", "H100", "A100"):
        if key in up:
            return PEAKS[key]
    if "CPU" in up or "cpu" in device_name:
        cores = os.cpu_count() or 2
        base = PEAKS["CPU"]
        return DevicePeaks(f"CPU ({cores} cores, estimate)", base.hbm_GBps, 0.1 * cores, 0.1 * cores,
                           0.2 * cores, 0, base.source)
    raise KeyError(f"no peak table entry for device {device_name!r}; known: {', '.join(PEAKS)}")


def roofline(seconds: float, *, bytes: float | None = None, flops: float | None = None,
             device: str | DevicePeaks | None = None, int8: bool = False) -> dict:
    """Achieved GB/s and TFLOP/s for an operation that took ``seconds``, and % of the peaks.

    bytes: the fewest bytes the operation must move through device memory (each input read once,
    each output written once). flops: the arithmetic it must do (2 per multiply-add).
    """
    if seconds <= 0:
        raise ValueError(f"roofline: seconds must be > 0, got {seconds}")
    peaks = device if isinstance(device, DevicePeaks) else device_peaks(device)
    out: dict = {"seconds": seconds, "device_peaks": peaks.name}
    t_mem = t_cmp = 0.0
    if bytes is not None:
        out["GBps"] = bytes / seconds / 1e9
        out["pct_peak_bw"] = 100.0 * out["GBps"] / peaks.hbm_GBps
        t_mem = bytes / (peaks.hbm_GBps * 1e9)
    if flops is not None:
        rate = peaks.int8_TOPs if int8 else peaks.fp16_TFLOPs
        out["TFLOPs"] = flops / seconds / 1e12
        out["pct_peak_compute"] = 100.0 * out["TFLOPs"] / rate
        t_cmp = flops / (rate * 1e12)
    if bytes is not None or flops is not None:
        out["bound"] = "memory" if t_mem >= t_cmp else "compute"
        out["floor_s"] = max(t_mem, t_cmp)
        out["pct_of_floor"] = 100.0 * out["floor_s"] / seconds
    return out


def attainable_seconds(*, bytes: float = 0.0, flops: float = 0.0, device: str | DevicePeaks | None = None,
                       int8: bool = False) -> float:
    """The roofline floor: max(bytes / bandwidth, flops / compute rate)."""
    peaks = device if isinstance(device, DevicePeaks) else device_peaks(device)
    rate = peaks.int8_TOPs if int8 else peaks.fp16_TFLOPs
    return max(bytes / (peaks.hbm_GBps * 1e9), flops / (rate * 1e12))
