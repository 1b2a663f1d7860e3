"""Benchmarks of timo_hf: `python -m benchmarks --help` (attention kernels, whole backbone, memory, Table 7 FLOPs)."""
