"""Tensor-parallel targets: the draft's work is done once, on the first rank of the target's tensor-parallel group.

A target sharded with transformers' own tensor parallelism (`from_pretrained(..., tp_plan="auto")` under `torchrun`,
see `compat.tensor_parallel_kwargs`) holds a slice of the KV heads on every rank, and SpecKV's selection is per KV
head, so each rank scores and keeps its own heads with no extra communication. What must agree across the ranks is
what the draft decides: SpecKV's preview (the voting tokens) and SpecPC's compressed prompt (the ids the target
reads). Every rank holds the replicated draft, but nothing guarantees that its kernels give bit-identical tokens
everywhere, and ranks that disagree would feed different sequences to one sharded forward. So the first rank of the
group computes them and broadcasts the result; the other ranks do not run the draft at all.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any, Callable

import torch

from .adapters import unwrap_adapters


def tensor_parallel_group(model) -> tuple[Any, int] | None:
    """`(process group, global rank of its first member)` of `model`'s tensor parallelism, or `None` when the model
    is not sharded (or `torch.distributed` is not initialised).

    The group is read from the device mesh of the model's sharded parameters (`DTensor`s): the mesh itself when it is
    one-dimensional (transformers 4.56), its `"tp"` dimension otherwise (5.x).
    """
    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return None
    model = unwrap_adapters(model)
    if not (getattr(model, "tp_size", None) or 1) > 1:
        return None
    for parameter in model.parameters():
        mesh = getattr(parameter, "device_mesh", None)
        if mesh is None:
            continue
        names = getattr(mesh, "mesh_dim_names", None) or ()
        if mesh.ndim == 1:
            group = mesh.get_group()
        elif "tp" in names:
            group = mesh.get_group("tp")
        else:
            continue
        return group, torch.distributed.get_global_rank(group, 0)
    return None


def _map_tensors(value, function):
    if isinstance(value, torch.Tensor):
        return function(value)
    if isinstance(value, (list, tuple)):
        mapped = [_map_tensors(item, function) for item in value]
        return type(value)(mapped) if isinstance(value, list) else tuple(mapped)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.replace(value, **{field.name: _map_tensors(getattr(value, field.name), function)
                                             for field in dataclasses.fields(value) if field.init})
    return value


class TensorParallelRankError(RuntimeError):
    """Raised on every rank when the first tensor-parallel rank failed to compute what it broadcasts."""


class TensorParallelPromptError(ValueError):
    """Raised on every rank when the ranks of one tensor-parallel group were given different prompts."""


def _digest(inputs) -> list[int]:
    """A fingerprint of the tensors in `inputs` (shapes and values), comparable across ranks."""
    digest = hashlib.sha256()
    for tensor in inputs:
        tensor = tensor.detach().to("cpu").contiguous()
        digest.update(repr((tuple(tensor.shape), str(tensor.dtype))).encode())
        digest.update(tensor.numpy().tobytes())
    return list(digest.digest()[:16])


def _check_same_inputs(inputs, group, first) -> None:
    """Every rank compares its inputs with the first rank's; all ranks raise together on a mismatch (a rank that
    raised alone would leave the others waiting in the next collective)."""
    message = [_digest(inputs) if torch.distributed.get_rank() == first else None]
    torch.distributed.broadcast_object_list(message, src=first, group=group)
    differs = torch.tensor([int(message[0] != _digest(inputs))])
    torch.distributed.all_reduce(differs, op=torch.distributed.ReduceOp.MAX, group=group)
    if int(differs):
        raise TensorParallelPromptError(
            "The ranks of this tensor-parallel group were given different prompts (ids or masks). They run one "
            "sharded forward together, so every rank must pass the same inputs: build the batch identically on "
            "every rank (e.g. from the same seed or from rank 0's broadcast)."
        )


def check_same_inputs_across_ranks(model, *inputs) -> None:
    """On a tensor-parallel `model`, raises [`TensorParallelPromptError`] on every rank unless all ranks hold the same
    `inputs` (tensors; `None`s are skipped); nothing when the model is not sharded."""
    found = tensor_parallel_group(model)
    if found is not None:
        _check_same_inputs([tensor for tensor in inputs if tensor is not None], *found)


def computed_on_first_rank(model, compute: Callable[[], Any], device: torch.device | str, inputs=()):
    """`compute()` run on the first rank of `model`'s tensor-parallel group and broadcast to the others (tensors,
    tuples, lists and dataclasses of them), moved to `device`; simply `compute()` when `model` is not sharded.

    `inputs` (tensors) are what `compute` reads: every rank must hold the same, or all raise
    [`TensorParallelPromptError`] before any work. If the first rank fails, it broadcasts the failure first, so that
    every rank raises instead of waiting forever: the first rank re-raises its exception, the others raise
    [`TensorParallelRankError`] with its message.
    """
    found = tensor_parallel_group(model)
    if found is None:
        return compute()
    group, first = found
    if inputs:
        _check_same_inputs(inputs, group, first)
    if torch.distributed.get_rank() == first:
        try:
            value = compute()
        except BaseException as error:
            torch.distributed.broadcast_object_list([("error", f"{type(error).__name__}: {error}")], src=first,
                                                    group=group)
            raise
        message = [("value", _map_tensors(value, lambda tensor: tensor.detach().cpu()))]
    else:
        message = [None]
    torch.distributed.broadcast_object_list(message, src=first, group=group)
    kind, payload = message[0]
    if kind == "error":
        raise TensorParallelRankError(
            f"The first tensor-parallel rank (global rank {first}) failed while running the draft: {payload}"
        )
    if torch.distributed.get_rank() == first:
        return value
    return _map_tensors(payload, lambda tensor: tensor.to(device))


__all__ = ["TensorParallelPromptError", "check_same_inputs_across_ranks", "TensorParallelRankError", "computed_on_first_rank", "tensor_parallel_group"]
