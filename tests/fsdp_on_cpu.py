"""Run a training script under accelerate's FSDP on CPU processes (gloo), for the scale-out tests.

    ACCELERATE_USE_CPU=1 accelerate launch --config_file training/accelerate/fsdp.yaml --num_processes 2 \
        --mixed_precision no tests/fsdp_on_cpu.py training/pretrain.py --config ...

accelerate 1.15 turns its FSDP plugin on only for accelerator devices: with `ACCELERATE_USE_CPU=1` it silently runs
plain DDP instead (`AcceleratorState` promotes MULTI_GPU, MULTI_NPU, ... to FSDP, never MULTI_CPU). This launcher
lifts that one gate and nothing else, so the scripts go through accelerate's real FSDP2 code paths (fully_shard with
the yaml's wrap policy, sharded `save_state` / `load_state` with torch.distributed.checkpoint, full state dict
gathering) on the CPU processes that CI has.
"""

import runpy
import sys

from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType


_original_init = AcceleratorState.__init__


def _init_allowing_fsdp_on_cpu(self, *args, fsdp_plugin=None, **kwargs):
    _original_init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
        self.distributed_type = DistributedType.FSDP
        self.fsdp_plugin = fsdp_plugin
        # later AcceleratorState() calls copy the partial state over their own: keep both in step, as on GPUs
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP


if __name__ == "__main__":
    AcceleratorState.__init__ = _init_allowing_fsdp_on_cpu
    script, sys.argv = sys.argv[1], sys.argv[1:]
    runpy.run_path(script, run_name="__main__")
