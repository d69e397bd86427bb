"""What mm-trainer needs to know about sharded parameters (FSDP2 `DTensor`, DeepSpeed ZeRO-3 partitions).

Under DDP and on one process every rank holds every parameter whole. Under FSDP2 each parameter is a `DTensor`
whose local part is a shard; its `shape` and `numel()` are the full ones and `full_tensor()` gathers it (a
collective). Under DeepSpeed ZeRO-3 a parameter holds an empty tensor outside the forward / backward of its module;
`ds_shape` / `ds_numel` give its real size and `deepspeed.zero.GatheredParameters` gathers it (a collective).
Every function here that gathers must be called on every rank, in the same order.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch

try:  # torch >= 2.4
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover
    DTensor = None  # type: ignore[assignment,misc]


def is_dtensor(tensor: Any) -> bool:
    """Whether `tensor` is a `DTensor` (an FSDP2 parameter or gradient)."""
    return DTensor is not None and isinstance(tensor, DTensor)


def is_zero3_param(param: Any) -> bool:
    """Whether `param` is managed by DeepSpeed ZeRO-3 (it may hold an empty partition outside its module's use)."""
    return hasattr(param, "ds_id") and hasattr(param, "ds_numel")


def full_numel(param: torch.Tensor) -> int:
    """Elements of the whole parameter, however it is sharded."""
    if is_zero3_param(param):
        return int(param.ds_numel)
    return param.numel()  # a DTensor's numel() is the global one


def full_shape(param: torch.Tensor) -> tuple[int, ...]:
    """Shape of the whole parameter, however it is sharded."""
    if is_zero3_param(param):
        return tuple(param.ds_shape)
    return tuple(param.shape)


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of `tensor` (the tensor itself unless it is a `DTensor`)."""
    return tensor.to_local() if is_dtensor(tensor) else tensor


@contextlib.contextmanager
def gathered(params: Sequence[torch.Tensor]) -> Iterator[list[torch.Tensor]]:
    """The whole tensors of `params`, on every rank, for reading inside the `with` block (a collective: call it on
    every rank with the same parameters in the same order).

    A `DTensor` is gathered with `full_tensor()`, ZeRO-3 parameters with one `GatheredParameters` for all of
    them (partitioned again on exit); anything else is yielded as it is. Do not modify what is yielded.
    """
    zero3 = [p for p in params if is_zero3_param(p)]
    with contextlib.ExitStack() as stack:
        if zero3:
            import deepspeed

            stack.enter_context(deepspeed.zero.GatheredParameters(zero3, modifier_rank=None))
        out = []
        for p in params:
            data = p.detach()
            if is_dtensor(data):
                data = data.full_tensor()
            out.append(data)
        yield out
