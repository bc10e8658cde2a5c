"""The levers of activation memory that `bigadapt estimate` models (accounting.activations), made real:
activation checkpointing (`train.activation_checkpointing`, `train.checkpoint_every`, `train.checkpoint_reentrant`)
and the attention implementation (`model.attn_implementation`, passed to transformers by model.build_base).

Checkpointing uses transformers' own switch (each block's `gradient_checkpointing` flag, which checkpoints the
block's `forward`: the block's own hooks, ZeRO-3's and PreLayer's, stay outside the recompute) and then turns the
flag off on the blocks that are not every k-th. A block without that flag (custom remote code) is wrapped here.
torch's checkpoint keeps `preserve_rng_state=True`: a recomputed dropout draws the same mask as the forward did.
"""
from __future__ import annotations

import functools
import importlib.util

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from . import targets
from .errors import ConfigError


def check_runnable(cfg, stage: int) -> None:
    """What needs this machine, before any process group (config.validate cannot tell: an estimate for a GPU
    cluster may be made on a laptop): flash_attention_2 needs CUDA and the flash_attn package; non-reentrant
    checkpointing under ZeRO-3 needs a DeepSpeed that keeps frozen parameters whole during a recompute."""
    reentrant(cfg.train, stage)
    if cfg.model.attn_implementation != "flash_attention_2":
        return
    missing = [what for what, ok in (("a CUDA GPU", torch.cuda.is_available()),
                                     ("the flash_attn package", importlib.util.find_spec("flash_attn") is not None))
               if not ok]
    if missing:
        raise ConfigError(f"model.attn_implementation=flash_attention_2: needs {' and '.join(missing)}; "
                          f"pip install flash-attn on a CUDA machine, or use sdpa")


def zero3_recompute_safe() -> bool:
    """Whether this DeepSpeed keeps a frozen parameter gathered while a checkpointed block is recomputed.

    Before DeepSpeed PR 8148 ZeRO-3's forward post-hook partitions it in place during the recompute, and torch's
    non-reentrant checkpoint, which holds frozen tensors undetached, fails with "saved shape [n] vs recomputed
    [0]" (PR 8130's report). 0.19.8 has the fix (tests/distributed/test_recompute.py); an earlier release or
    build is recognised by the fix's test for a recompute, `_current_graph_task_id`, in the gather code."""
    import inspect

    import deepspeed
    from deepspeed.runtime.zero import partitioned_param_coordinator as coordinator
    from packaging.version import Version
    if Version(deepspeed.__version__).release >= (0, 19, 8):
        return True
    try:
        return "_current_graph_task_id" in inspect.getsource(coordinator)
    except (OSError, TypeError):  # no source shipped: assume the older behaviour
        return False


def reentrant(tcfg, stage: int) -> bool:
    """train.checkpoint_reentrant, or automatic (null): torch's non-reentrant form unless ZeRO-3 on a DeepSpeed
    without the recompute fix, where only the reentrant form runs. Asking for non-reentrant there is refused."""
    if not tcfg.activation_checkpointing or stage != 3 or zero3_recompute_safe():
        return bool(tcfg.checkpoint_reentrant)
    if tcfg.checkpoint_reentrant is False:
        import deepspeed
        raise ConfigError(f"train.checkpoint_reentrant=false: ZeRO-3 with DeepSpeed {deepspeed.__version__} crashes "
                          f"recomputing frozen parameters (DeepSpeed PR 8130/8148); upgrade DeepSpeed, or set it "
                          f"to true or null")
    return True


def checkpointed(n_blocks: int, every: int) -> list[int]:
    """Indices of the blocks that are checkpointed: 0, k, 2k, ... (transformers' every_n_layers counts the same)."""
    return list(range(0, n_blocks, every))


def enable(model: nn.Module, tcfg, stage: int, wrap: bool = False) -> list[int]:
    """Turn on activation checkpointing for a training run (before deepspeed.initialize); returns the indices of
    the checkpointed blocks (none when train.activation_checkpointing is off). `wrap`: this module's own block
    wrapper even where transformers' switch exists (tests)."""
    if not tcfg.activation_checkpointing:
        return []
    try:
        _, blocks = targets.layer_list(model)
    except ConfigError as e:  # checkpointing is per block: say which switch asked for them
        raise ConfigError(f"{e} (train.activation_checkpointing checkpoints per block), or set "
                          f"train.activation_checkpointing=false") from None
    chosen = checkpointed(len(blocks), tcfg.checkpoint_every)
    use_reentrant = reentrant(tcfg, stage)
    native = all(hasattr(b, "gradient_checkpointing") for b in blocks) and model.supports_gradient_checkpointing
    if native and not wrap:
        _transformers_enable(model, use_reentrant)
        for i, block in enumerate(blocks):
            block.gradient_checkpointing = i in chosen
    else:
        for i in chosen:
            wrap_block(blocks[i], functools.partial(checkpoint, use_reentrant=use_reentrant))
    if use_reentrant:
        # reentrant checkpoint differentiates only through inputs that require grad: with a frozen embedding the
        # first block's input does not, and every adapter inside a checkpointed block would get no gradient
        model.enable_input_require_grads()
    model.config.use_cache = False  # a KV cache would be written twice: in the forward and in the recompute
    return chosen


def _transformers_enable(model: nn.Module, reentrant: bool) -> None:
    kwargs = {"use_reentrant": reentrant}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x; the older name warns there
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def wrap_block(block: nn.Module, ckpt) -> None:
    """Checkpoint `block.forward` (not `__call__`, so the block's own hooks run once) in training mode."""
    forward = block.forward

    def forward_checkpointed(*args, **kwargs):
        if not (block.training and torch.is_grad_enabled()):
            return forward(*args, **kwargs)
        kwargs.pop("past_key_values", None)  # nothing to cache in training; a cache would be written twice
        return ckpt(functools.partial(forward, **kwargs), *args)

    block.forward = forward_checkpointed
