"""TEST-ONLY shim: let accelerate 1.15 run FSDP2 on CPU processes (gloo), for the 2-process tests on CI.

accelerate 1.15 takes its FSDP path only for GPU-like distributed types: on CPU (``ACCELERATE_USE_CPU=true``) it builds
the FSDP plugin from the launcher's environment but keeps ``DistributedType.MULTI_CPU``, so the run silently becomes
DDP. torch itself shards on a CPU mesh (``fully_shard``), so after accelerate has set its state up this shim switches
the distributed type to FSDP and hands it the plugin, nothing else. It acts only when both ``ACCELERATE_USE_CPU`` and
``ACCELERATE_USE_FSDP`` are ``true`` in the environment, i.e. under::

    ACCELERATE_USE_CPU=true PYTHONPATH=tests/shims/cpu_fsdp:. \
        accelerate launch --config_file recipes/accelerate/fsdp_cpu.yaml SCRIPT ...

Python imports a ``sitecustomize`` module found on ``PYTHONPATH`` at start-up. This file is never part of mm-trainer:
product code does not patch accelerate. On GPUs, ``recipes/accelerate/fsdp.yaml`` needs no shim.
"""

import os


def _flag(name: str) -> bool:
    return os.environ.get(name, "false").lower() == "true"


if _flag("ACCELERATE_USE_CPU") and _flag("ACCELERATE_USE_FSDP"):
    from accelerate import state as _state
    from accelerate.utils import DistributedType as _DistributedType

    _original_init = _state.AcceleratorState.__init__

    def _init_with_cpu_fsdp(self, *args, **kwargs):
        _original_init(self, *args, **kwargs)
        plugin = kwargs.get("fsdp_plugin")
        if plugin is not None and self.distributed_type == _DistributedType.MULTI_CPU:
            self.distributed_type = _DistributedType.FSDP
            self.fsdp_plugin = plugin

    _state.AcceleratorState.__init__ = _init_with_cpu_fsdp
