"""Turning a whole tensor into a ZeRO-3 parameter that keeps only this rank's partition, one tensor at a time:
what a loader uses when it must compute each tensor whole before it can be split (a bitsandbytes 4-bit weight is
quantized from the whole full-precision tensor: its absmax per block and the double-quantization offset depend on
all of it). Part of `bigadapt.zero`: import it from there."""
from __future__ import annotations

import torch
from torch import nn

from . import params


class Partitioner:
    """*Collective* per call (DeepSpeed broadcasts each tensor from rank 0 as it converts it: every rank must pass
    the same tensors in the same order). The first call converts through `deepspeed.zero.Init(module=...)` with the
    registered ZeRO-3 config, later ones through the converted parameter's own `convert_to_zero_parameters`: the
    two ways deepspeed.initialize itself converts parameters that were built outside zero.Init. After each call
    the parameter's whole data is freed; attributes set on it before (a bitsandbytes quant_state) stay, whole."""

    def __init__(self, dtype: torch.dtype):
        self.dtype, self.first = dtype, None

    def __call__(self, param: nn.Parameter) -> None:
        if self.first is None:
            import deepspeed
            holder = nn.Module()
            holder.register_parameter("p", param)
            deepspeed.zero.Init(module=holder, config_dict_or_path=params.registered_config(), dtype=self.dtype)
            self.first = param
        else:
            self.first.convert_to_zero_parameters(param_list=[param])


def load_device() -> torch.device:
    """Where zero.Init keeps a parameter's partition (DeepSpeed's local device: this rank's GPU, or the CPU): a
    tensor that must be computed whole before partitioning (a 4-bit weight and its quant state) is computed there,
    as transformers quantizes on the device its device_map names."""
    import os

    from deepspeed.accelerator import get_accelerator
    return torch.device(get_accelerator().device_name(int(os.environ.get("LOCAL_RANK", "0"))))
