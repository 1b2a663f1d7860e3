"""Measurement helpers shared by the benchmark cases: timing, peak memory, matmul peak, machine description."""

import os
import platform
import resource
import statistics
import subprocess
import time
import weakref
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from timo_hf import buffer_pool


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


CLOCKS = {
    # Wall-clock time: what a user waits for; the default.
    "wall": time.perf_counter,
    # CPU time of the process: robust to other processes on a shared machine, but only meaningful with one
    # thread (with several it also counts threads spinning while they wait).
    "cpu": time.process_time,
}
CLOCK = CLOCKS["wall"]


def time_runs(
    function, device: str, repeats: int, warmup: int = 1, min_seconds: float = 0.0, max_repeats: int = 50
) -> list[float]:
    """Seconds (by `CLOCK`) of at least `repeats` calls after `warmup` calls; short cases are repeated until they
    have run `min_seconds` in all (at most `max_repeats` times), so that their median is stable."""
    return time_and_count_runs(function, device, repeats, warmup, min_seconds, max_repeats)[0]


def time_and_count_runs(
    function, device: str, repeats: int, warmup: int = 1, min_seconds: float = 0.0, max_repeats: int = 50
) -> tuple[list[float], list[int]]:
    """`time_runs`, and the minor page faults of this process during each timed call (first touches of memory the
    allocator got from the system; each zero-fills a 4 KiB page), so that a slow run can be told from slow code."""
    for _ in range(warmup):
        function()
    synchronize(device)
    times, faults = [], []
    while len(times) < repeats or (sum(times) < min_seconds and len(times) < max_repeats):
        faults_before = _minor_faults()
        start = CLOCK()
        function()
        synchronize(device)
        times.append(CLOCK() - start)
        faults.append(_minor_faults() - faults_before)
    return times, faults


def _minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def alternate_runs(functions: dict, repeats: int) -> dict:
    """Seconds of `repeats` runs of each function, run alternately (after one warm-up each), so that load drifts on
    a shared machine hit all of them alike."""
    for function in functions.values():
        function()
    times = {name: [] for name in functions}
    for _ in range(repeats):
        for name, function in functions.items():
            start = time.perf_counter()
            function()
            times[name].append(time.perf_counter() - start)
    return times


def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


class PeakMemory:
    """Extra memory a block of code needs at its peak, in bytes.

    CUDA: `torch.cuda.max_memory_allocated` above what was allocated before. CPU (Linux): the process's peak
    resident set (VmHWM, reset through /proc/self/clear_refs) above the resident set before, i.e. what the pages
    touched by the block cost, allocator caching included.
    """

    def __init__(self, device: str):
        self.device = device
        self.peak_bytes = None

    def __enter__(self):
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._before = torch.cuda.memory_allocated()
        else:
            with open("/proc/self/clear_refs", "w") as clear_refs:
                clear_refs.write("5")
            self._before = _proc_status_kib("VmRSS") * 1024
        return self

    def __exit__(self, *exc):
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            self.peak_bytes = torch.cuda.max_memory_allocated() - self._before
        else:
            self.peak_bytes = _proc_status_kib("VmHWM") * 1024 - self._before
        return False


class TensorMemory(TorchDispatchMode):
    """Peak bytes of the tensor storages created inside the block and alive at the same time (any device).

    Counts every storage an operator returns, freed when its storage is; deterministic, unlike the resident set.
    Tensors created before the block (inputs, weights) do not count, nor do views, in-place results or `out=`
    results of them. The fast kernels' pooled buffers (`timo_hf.buffer_pool`) count whole while a tensor uses them,
    not while they wait in the pool (as memory the heap keeps after a free does not count). Scratch memory inside a
    kernel (e.g. the blocks of a fused attention kernel) is not seen, nor is memory allocated by compiled (inductor)
    code. Under any dispatch mode autograd sums two gradients of one tensor out of place (in a plain run it adds one
    to the other in place), so such a sum counts here as one tensor more than a plain run makes.
    """

    def __init__(self):
        super().__init__()
        self.current = 0
        self.peak_bytes = 0
        self._live = {}

    def _free(self, key):
        self.current -= self._live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        arguments = {
            tensor.untyped_storage().data_ptr()
            for tensor in tree_leaves((args, kwargs))
            if isinstance(tensor, torch.Tensor) and tensor.device.type != "meta"
        }
        out = func(*args, **(kwargs or {}))
        pooled = buffer_pool.pooled_storages()
        pooled_pointers = {storage.data_ptr() for storage, _ in pooled}
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor) and tensor.device.type != "meta":
                storage = tensor.untyped_storage()
                key = id(storage)
                older = storage.data_ptr() in arguments or storage.data_ptr() in pooled_pointers
                if key not in self._live and storage.nbytes() and not older:
                    self._live[key] = storage.nbytes()
                    self.current += storage.nbytes()
                    weakref.finalize(storage, self._free, key)
        for storage, _ in pooled:  # a buffer the pool took in after this block made it: counted as pooled from now
            self._free(id(storage))
        in_use = sum(storage.nbytes() for storage, used in pooled if used)
        self.peak_bytes = max(self.peak_bytes, self.current + in_use)
        return out


def measure_memory(function, device: str) -> dict:
    """Run `function` twice: once for the resident-set / CUDA-allocator peak, once for the tensor peak."""
    with PeakMemory(device) as resident:
        function()
    with TensorMemory() as tensors:
        function()
    return {"peak_bytes": tensors.peak_bytes, "peak_resident_bytes": resident.peak_bytes}


def matmul_peak(device: str, dtype: torch.dtype = torch.float32, sizes=(2048, 4096), repeats: int = 7) -> dict:
    """Measured matmul throughput (FLOP/s) in `dtype`: the best size's median over `repeats` products."""
    best = {"flops_per_s": 0.0}
    for size in sizes:
        left = torch.randn(size, size, device=device, dtype=dtype)
        right = torch.randn(size, size, device=device, dtype=dtype)
        out = torch.empty(size, size, device=device, dtype=dtype)
        times = time_runs(lambda: torch.mm(left, right, out=out), device, repeats, warmup=2)
        rate = 2 * size**3 / statistics.median(times)
        if rate > best["flops_per_s"]:
            best = {"flops_per_s": rate, "size": size, "median_s": statistics.median(times), "dtype": str(dtype)}
    return best


def machine_info(device: str) -> dict:
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": device,
    }
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
        with open("/proc/meminfo") as meminfo:
            info["memory_gib"] = round(int(meminfo.readline().split()[1]) / 2**20, 1)
    except OSError:
        pass
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    info["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name()
    return info


def cpu_times() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs since boot, from /proc/stat (Linux); (0, 0) elsewhere."""
    try:
        with open("/proc/stat") as stat:
            fields = [int(value) for value in stat.readline().split()[1:]]
    except OSError:
        return 0, 0
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return sum(fields[:8]) - idle, sum(fields[:8])


def busy_fraction(seconds: float = 1.0) -> float:
    """Fraction of all CPUs busy (with anything) over the next `seconds`."""
    busy0, total0 = cpu_times()
    time.sleep(seconds)
    busy1, total1 = cpu_times()
    return (busy1 - busy0) / max(total1 - total0, 1)


def wait_until_idle(threshold: float = 0.1, max_wait: float = 300.0) -> float:
    """Wait (at most `max_wait` s) until other processes use less than `threshold` of the CPUs; return the last
    measured busy fraction. Timings on a shared machine are only comparable when it is otherwise idle."""
    deadline = time.monotonic() + max_wait
    busy = busy_fraction()
    while busy > threshold and time.monotonic() < deadline:
        time.sleep(2.0)
        busy = busy_fraction()
    return busy


def code_version(root: Path) -> dict:
    """The code a run measures: `{"commit": sha, "changed": [paths]}` for the git checkout at `root` (the tracked
    files that differ from the commit and the untracked ones git does not ignore, as `git status` lists them), or
    `{"commit": None}` where `root` is not one (a copy of the working tree without `.git`, as a lent GPU gets)."""
    def git(*args):
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, check=True).stdout

    if not (root / ".git").exists():
        return {"commit": None}
    try:
        commit = git("rev-parse", "HEAD").strip()
        status = git("status", "--porcelain", "--untracked-files=all", "--", ".")
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None}
    return {"commit": commit, "changed": sorted(line[3:] for line in status.splitlines() if line.strip())}


def load_average() -> str:
    try:
        return " ".join(f"{value:.2f}" for value in os.getloadavg())
    except OSError:
        return "n/a"
