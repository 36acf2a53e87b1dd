"""Processes and devices: one process per GPU under ``torchrun``, otherwise a single process.

``torchrun`` sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``; with ``WORLD_SIZE > 1`` the model
is replicated (DDP) or sharded (FSDP2, ``torch.distributed.fsdp.fully_shard``), NCCL on GPUs and
gloo on CPUs. Only rank 0 logs and writes checkpoints.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

from dla.errors import ConfigError


@dataclass
class Runtime:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_runtime(device: str) -> Runtime:
    """The device and, under torchrun with several processes, the process group."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda but no GPU is available (torch.cuda.is_available() is False)")
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        torch.cuda.set_device(local_rank)
    runtime = Runtime(rank, world_size, local_rank, torch.device(f"cuda:{local_rank}" if use_cuda else "cpu"))
    if runtime.distributed and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo",
                                device_id=runtime.device if use_cuda else None)
    return runtime


def shutdown(runtime: Runtime) -> None:
    if runtime.distributed and dist.is_initialized():
        dist.destroy_process_group()


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Non-reentrant checkpointing per block (before FSDP shards them), through the transformers
    API of the installed version (``gradient_checkpointing_enable`` warns from transformers 5.x)."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def wrap_model(model: nn.Module, runtime: Runtime, parallel: str) -> nn.Module:
    """DDP or FSDP2 around ``model`` (already on its device) when there are several processes.

    FSDP2 shards every block (each element of the model's outermost ``nn.ModuleList``) and then
    the rest (embeddings, final norm, head) at the root. Both keep the parameter names of
    ``model`` (DDP under a ``module.`` prefix), which is what the checkpoints rely on."""
    if not runtime.distributed:
        return model
    if parallel == "ddp":
        return nn.parallel.DistributedDataParallel(
            model, device_ids=[runtime.local_rank] if runtime.device.type == "cuda" else None)
    from torch.distributed.fsdp import fully_shard

    for block in outer_blocks(model):
        fully_shard(block)
    return fully_shard(model)


def outer_blocks(model: nn.Module) -> list[nn.Module]:
    """The elements of the ``nn.ModuleList``s that are not inside another ``ModuleList``."""
    blocks, inner = [], set()
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and id(module) not in inner:
            blocks += list(module)
            inner |= {id(m) for m in module.modules()}
    return blocks


def unwrap(model: nn.Module) -> nn.Module:
    """The model without DDP's wrapper (FSDP2 shards the model in place)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def gradient_sync(model: nn.Module, sync: bool):
    """A context in which backward does (``sync``) or does not all-reduce gradients: the last
    micro-batch of an accumulation syncs, the others only accumulate locally."""
    if isinstance(model, nn.parallel.DistributedDataParallel) and not sync:
        return model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(sync)
    return contextlib.nullcontext()


def all_reduce_sum(values: list[float], runtime: Runtime) -> list[float]:
    """Sum a few numbers over all processes (one collective)."""
    if not runtime.distributed:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=runtime.device)
    dist.all_reduce(t)
    return t.tolist()
