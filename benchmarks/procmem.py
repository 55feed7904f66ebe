"""This process's resident memory, for the benchmarks that report peaks (Linux ``/proc``).

Light on purpose (no torch, no keeper): a benchmark imports it before what it measures.
"""

from __future__ import annotations

from pathlib import Path


def memory_mb() -> tuple[float, float]:
    """(RSS, peak RSS) of this process in MB."""
    got = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            got[line.split(":")[0]] = int(line.split()[1]) / 1024
    return got["VmRSS"], got["VmHWM"]


def reset_peak() -> None:
    """Set the peak (VmHWM) to the current RSS (Linux >= 4.0), so the next peak is a step's."""
    Path("/proc/self/clear_refs").write_text("5")
