"""Measurement helpers shared by the benchmark cases: timing, peak memory, matmul peak, machine description."""

import os
import platform
import statistics
import time

import torch


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_runs(function, device: str, repeats: int, warmup: int = 1) -> list[float]:
    """Wall-clock seconds of `repeats` calls after `warmup` calls."""
    for _ in range(warmup):
        function()
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        synchronize(device)
        times.append(time.perf_counter() - start)
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


def matmul_peak(device: str, sizes=(2048, 4096), repeats: int = 7) -> dict:
    """Measured float32 matmul throughput (FLOP/s): the best size's median over `repeats` products."""
    best = {"flops_per_s": 0.0}
    for size in sizes:
        left = torch.randn(size, size, device=device)
        right = torch.randn(size, size, device=device)
        out = torch.empty(size, size, device=device)
        times = time_runs(lambda: torch.mm(left, right, out=out), device, repeats, warmup=2)
        rate = 2 * size**3 / statistics.median(times)
        if rate > best["flops_per_s"]:
            best = {"flops_per_s": rate, "size": size, "median_s": statistics.median(times)}
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


def load_average() -> str:
    try:
        return " ".join(f"{value:.2f}" for value in os.getloadavg())
    except OSError:
        return "n/a"
