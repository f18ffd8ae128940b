"""Dividing work between processes (Accelerate / torch.distributed underneath).

Every rank reads the same global batch (the same data, the same shuffler), takes its
contiguous shard of it, and splits that shard into `train.grad_accum` micro-batches. A loss is
a sum over the shard's items divided by the count over the *global* batch, times the world
size: DDP averages gradients over ranks, so the all-reduced gradient is exactly the gradient
of the global batch's mean, whatever the number of processes or micro-batches. So a run on N
processes computes what one process does (up to float summation order).

One process is plain PyTorch: every helper here is then the identity, and nothing is
all-reduced.
"""

from __future__ import annotations

import contextlib
from typing import ContextManager, Sequence, TypeVar

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from torch.distributed.fsdp import FSDPModule

from rlhf.errors import ParamsError

T = TypeVar("T")


def check_divisible(what: str, size: int, world_size: int, grad_accum: int,
                    **other_parts: int) -> None:
    """A global batch must split evenly over processes, micro-batches (and e.g. minibatches)."""
    parts = {"train.num_processes": world_size, "train.grad_accum": grad_accum,
             **other_parts}
    needed = 1
    for n in parts.values():
        needed *= n
    if size % needed:
        names = " x ".join(f"{name} ({n})" for name, n in parts.items())
        raise ParamsError(f"{what}={size} does not split evenly into {names} = {needed} "
                          f"parts; use a multiple of {needed}")


def check_batches(stage: str, params, world_size: int) -> None:
    """The global batch of `stage` (its `batch` in the stage registry) splits over
    `world_size` processes and `train.grad_accum` micro-batches: checked by the stage, and
    before a launch."""
    from rlhf.stages import info

    if info(stage).batch is not None:
        what, size, other_parts = info(stage).batch(params)
        check_divisible(what, size, world_size, params.train.grad_accum, **other_parts)


def sync_gradients_if(last: bool, accelerator: Accelerator, model) -> ContextManager:
    """The context of one micro-batch's backward: DDP all-reduces (FSDP reduce-scatters) the
    accumulated gradients only after the `last` micro-batch of a step (`no_sync` before it)."""
    sharded = [m for m in model.modules() if isinstance(m, FSDPModule)]
    if sharded:
        for unit in sharded:
            unit.set_requires_gradient_sync(last, recurse=False)
        return contextlib.nullcontext()
    return contextlib.nullcontext() if last else accelerator.no_sync(model)


def shard_slice(size: int, accelerator: Accelerator) -> slice:
    """This rank's contiguous rows of a global batch of `size` (divisible by the world)."""
    share = size // accelerator.num_processes
    return slice(accelerator.process_index * share, (accelerator.process_index + 1) * share)


def uneven_slice(size: int, accelerator: Accelerator) -> slice:
    """This rank's contiguous rows of `size` rows that need not divide evenly (evaluation)."""
    rank, world = accelerator.process_index, accelerator.num_processes
    return slice(rank * size // world, (rank + 1) * size // world)


def shard(items: Sequence[T], accelerator: Accelerator) -> Sequence[T]:
    return items[shard_slice(len(items), accelerator)]


def micro_slices(size: int, grad_accum: int) -> list[slice]:
    """`grad_accum` equal, contiguous slices of `size` rows."""
    share = size // grad_accum
    return [slice(i * share, (i + 1) * share) for i in range(grad_accum)]


def sum_over_ranks(accelerator: Accelerator, value) -> torch.Tensor:
    """The sum over every rank of a scalar or tensor (partial losses, counts, statistics),
    in float64 so a sum of partial means does not depend on the world size's rounding."""
    tensor = torch.as_tensor(value, dtype=torch.float64).detach().to(accelerator.device)
    if accelerator.num_processes > 1:
        tensor = accelerator.reduce(tensor.clone(), reduction="sum")
    return tensor.cpu()


def gather_rows(accelerator: Accelerator, tensor: torch.Tensor, pad_value: float = 0,
                pad_first: bool = False) -> torch.Tensor:
    """Every rank's rows, in rank order, on every rank; dim 1 (if any) padded to the widest
    first (left-padded queries pad first). Booleans travel as integers (gloo has no bool)."""
    if accelerator.num_processes == 1:
        return tensor
    is_bool = tensor.dtype == torch.bool
    tensor = tensor.long() if is_bool else tensor.contiguous()
    if tensor.dim() > 1:
        tensor = accelerator.pad_across_processes(tensor, dim=1, pad_index=pad_value,
                                                  pad_first=pad_first)
    gathered = accelerator.gather(tensor)
    return gathered.bool() if is_bool else gathered


def gather_list(accelerator: Accelerator, items: list) -> list:
    """Every rank's Python objects, in rank order, on every rank."""
    return list(items) if accelerator.num_processes == 1 else gather_object(list(items))
