"""What the benchmark machine is and how busy it was: CPU facts, load average, foreign CPU use.

On a shared machine the load average alone cannot tell a benchmark's own work from somebody
else's: `CpuMeter` reads the whole machine's busy CPU time (``/proc/stat``) and the CPU time of
the processes being measured (``/proc/PID/stat``, threads included), and reports the
difference as ``other_cores``: cores' worth of CPU that other processes took during the run.
On a virtual machine it also reports ``steal_cores``: time the hypervisor ran something else
while this machine's CPUs had work (other guests on the same host; counted in ``other_cores``
too, since the measured processes did not get it). Linux only (returns nothing elsewhere).
Knows nothing about what is measured.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
import platform
import subprocess
import time
from collections.abc import Callable

CPU_FLAGS_OF_INTEREST = ("avx", "avx2", "fma", "f16c", "avx512f", "avx512_bf16", "avx512_fp16",
                         "avx512_vnni", "avx_vnni", "amx_bf16", "amx_tile", "amx_int8")
TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def cpu_info() -> dict:
    """`lscpu` model name, vendor, family and model numbers (the model name alone does not
    tell AMD's Zen 3, 4 and 5 VMs apart: "AMD EPYC" on all three), the flags that matter for
    fp32/fp16/bf16 kernels, and core counts."""
    model, flags = platform.processor() or "unknown", set()
    ids = {"Vendor ID": "vendor", "CPU family": "cpu_family", "Model": "cpu_model"}
    found: dict = {"vendor": "", "cpu_family": None, "cpu_model": None}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            key, _, value = line.partition(":")
            key, value = key.strip(), value.strip()
            if key == "Model name":
                model = value
            elif key == "Flags":
                flags = set(value.split())
            elif key in ids and not found[ids[key]]:  # the first (the CPU's, not the BIOS's)
                found[ids[key]] = value if key == "Vendor ID" else (
                    int(value) if value.isdigit() else None)
    except (OSError, subprocess.SubprocessError):
        pass
    return {"model_name": model, **found, "cpus": os.cpu_count(),
            "flags": {f: f in flags for f in CPU_FLAGS_OF_INTEREST},
            "flags_hash": hashlib.sha256(" ".join(sorted(flags)).encode()).hexdigest()[:8]}


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _machine_times_s() -> tuple[float, float] | None:
    """(seconds of non-idle CPU time, of which stolen by the hypervisor), summed over all cores
    since boot."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    steal = fields[7] if len(fields) > 7 else 0
    # guest time is already counted in user/nice: count only the first 8 fields
    return (sum(fields[:8]) - idle) / TICK, steal / TICK


def process_cpu_s(pid: int) -> float:
    """utime + stime of `pid` (all its threads); 0 when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            rest = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(rest[11]) + int(rest[12])) / TICK


def main_thread_cpu_s(pid: int) -> float:
    """CPU time of `pid`'s main thread (for camex-server, its HTTP event loop), from schedstat
    (nanoseconds); 0 when it is gone."""
    try:
        with open(f"/proc/{pid}/task/{pid}/schedstat") as f:
            return int(f.read().split()[0]) / 1e9
    except (OSError, IndexError, ValueError):
        return 0.0


def with_descendants(pid: int) -> list[int]:
    """`pid` and every process below it (a server's engine process is its child)."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        parents.setdefault(ppid, []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(parents.get(p, []))
    return out


class CpuMeter:
    """Context manager: machine CPU use during the block, split into ours and others'.

    ``pids``: the processes whose work is being measured (default: this process). ``parts``:
    named counters of CPU seconds (e.g. a server's event-loop thread, the client) whose
    differences over the block go to ``result["cpu_s"]``."""

    def __init__(self, pids: list[int] | None = None,
                 parts: dict[str, Callable[[], float]] | None = None):
        self.pids = pids or [os.getpid()]
        self.parts = parts or {}
        self.result: dict = {}

    def __enter__(self) -> CpuMeter:
        self.t0, self.machine0 = time.monotonic(), _machine_times_s()
        self.own0 = sum(process_cpu_s(p) for p in self.pids)
        self.parts0 = {name: read() for name, read in self.parts.items()}
        self.load0 = loadavg()
        return self

    def __exit__(self, *exc) -> None:
        wall = time.monotonic() - self.t0
        machine1, own1 = _machine_times_s(), sum(process_cpu_s(p) for p in self.pids)
        self.result = {"loadavg_before": self.load0, "loadavg_after": loadavg(),
                       "wall_s": round(wall, 3)}
        if self.parts:
            self.result["cpu_s"] = {name: round(read() - self.parts0[name], 4)
                                    for name, read in self.parts.items()}
        if self.machine0 is not None and machine1 is not None and wall > 0:
            busy = (machine1[0] - self.machine0[0]) / wall
            own = (own1 - self.own0) / wall
            self.result.update(busy_cores=round(busy, 3), own_cores=round(own, 3),
                               other_cores=round(max(0.0, busy - own), 3),
                               steal_cores=round((machine1[1] - self.machine0[1]) / wall, 3))
