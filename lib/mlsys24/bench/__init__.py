"""The workbench's benchmark harness: timing, roofline, provenance and the results registry.

Imports torch and numpy only, so GPU benchmarks run on a bare GPU machine as
``PYTHONPATH=lib python3 -m mlsys24.bench <paper>``.

- :func:`measure` — CUDA events + warm-up + L2 flush on GPU, ``perf_counter`` on CPU; median and spread.
- :func:`roofline`, :func:`device_peaks` — GB/s, TFLOP/s and % of peak for H100/H200/A100 (and a CPU estimate).
- :func:`environment` — device, torch/triton/CUDA versions, date, command, git revision.
- :func:`save_results`, :func:`load_results` — ``data/results/<paper>/<device>.json``.
"""

from .env import device_name, device_slug, environment
from .registry import BENCHMARKS
from .results import ResultFile, gpu_results, latest_results, load_results, save_results
from .roofline import PEAKS, DevicePeaks, attainable_seconds, device_peaks, roofline
from .timing import CUDAGraphed, Timing, copy_bandwidth, graph_floor, measure, measure_graphed

__all__ = [
    "BENCHMARKS", "CUDAGraphed", "PEAKS", "DevicePeaks", "ResultFile", "Timing", "attainable_seconds", "copy_bandwidth",
    "graph_floor",
    "device_name", "device_peaks", "device_slug", "environment", "gpu_results", "latest_results", "load_results",
    "measure", "measure_graphed", "roofline", "save_results",
]
