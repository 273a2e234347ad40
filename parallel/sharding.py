"""Where each parameter is split, and moving between full tensors and this rank's shard.

A parameter is declared once, where it is created (``declare``): how its *full* tensor is
initialised, along which dim tensor parallelism splits it (megatron-core's
``tensor_model_parallel`` / ``partition_dim`` attributes, which DeepSpeed also reads), and whether
its gradient is partial on each TP rank. Everything layout-related reads these declarations:

* ``initialize_parameters`` draws every full tensor from (seed, parameter name) and keeps this
  rank's shard, so one seed gives the same model at any TP size. A model built on the meta device
  (no memory) is materialised this way: only this rank's shard is ever allocated for keeps;
* ``full_state_dict`` / ``load_full_state_dict`` convert between shards and the layout-free
  full tensors used by checkpoints meant for export and inference.

Which shard a rank holds comes from the ``ParallelDims`` the model was built for, passed in.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterable

import torch
import torch.distributed as dist

from chimera.parallel.dims import SINGLE_PROCESS, ParallelDims

Init = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


# Initialisers: each fills a full tensor in place from a generator.


def normal(std: float) -> Init:
    return lambda t, g: t.normal_(0.0, std, generator=g)


def zeros(t: torch.Tensor, g: torch.Generator | None = None) -> torch.Tensor:
    return t.zero_()


def ones(t: torch.Tensor, g: torch.Generator | None = None) -> torch.Tensor:
    return t.fill_(1.0)


def declare(
    param: torch.nn.Parameter,
    *,
    init: Init,
    split_dim: int | None = None,
    expert_dim: int | None = None,
    partial_grad_over_tp: bool = False,
    weight_decay: bool | None = None,
    lr_scale: float = 1.0,
):
    """Record how ``param`` is initialised (on its full shape) and how it is split: over tensor-parallel ranks
    along ``split_dim``, over expert-parallel ranks along ``expert_dim`` (its experts).

    ``weight_decay``: whether AdamW decays it; by default matrices do and vectors (norms, biases) don't.
    ``lr_scale``: its learning rate is this times the run's (at every step of the schedule); 1 by default.
    """
    param.full_init = init
    param.weight_decay = param.dim() >= 2 if weight_decay is None else weight_decay
    param.lr_scale = lr_scale
    if split_dim is not None:
        for attr, value in (("tensor_model_parallel", True), ("partition_dim", split_dim), ("partition_stride", 1)):
            setattr(param, attr, value)  # megatron-core's attribute names, which DeepSpeed also reads
    if expert_dim is not None:
        if expert_dim == split_dim:
            raise ValueError("a parameter's expert dim and tensor-parallel dim must differ")
        param.expert_dim = expert_dim
    param.partial_grad_over_tp = partial_grad_over_tp
    return param


def split_dim(param: torch.Tensor) -> int | None:
    """The dim tensor parallelism splits ``param`` along, or None (replicated over TP ranks)."""
    return param.partition_dim if getattr(param, "tensor_model_parallel", False) else None


def expert_dim(param: torch.Tensor) -> int | None:
    """The dim expert parallelism splits ``param`` along (its experts), or None (not an expert parameter)."""
    return getattr(param, "expert_dim", None)


def local_shape(param: torch.Tensor) -> torch.Size:
    return torch.Size(getattr(param, "ds_shape", param.shape))  # ZeRO-3 keeps the true shape in ds_shape


def shard_box(param: torch.Tensor, dims: ParallelDims) -> tuple[tuple[int, int], ...]:
    """The region of the full tensor this rank's ``param`` holds: ``(start, stop)`` per dim."""
    shape = local_shape(param)
    box = [(0, n) for n in shape]
    for dim, rank in ((split_dim(param), dims.tp_rank), (expert_dim(param), dims.ep_rank)):
        if dim is not None:
            box[dim] = (rank * shape[dim], (rank + 1) * shape[dim])
    return tuple(box)


def full_shape(param: torch.Tensor, dims: ParallelDims) -> torch.Size:
    """The shape of ``param``'s full tensor (all tensor- and expert-parallel shards together)."""
    shape = list(local_shape(param))
    for dim, size in ((split_dim(param), dims.tp), (expert_dim(param), dims.ep)):
        if dim is not None:
            shape[dim] *= size
    return torch.Size(shape)


def shard_of(full: torch.Tensor, param: torch.Tensor, dims: ParallelDims) -> torch.Tensor:
    """This rank's shard of ``param``'s full tensor."""
    return full[tuple(slice(lo, hi) for lo, hi in shard_box(param, dims))]


def _param_seed(seed: int, name: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


def _owner(module: torch.nn.Module, name: str) -> tuple[torch.nn.Module, str]:
    path, _, leaf = name.rpartition(".")
    return (module.get_submodule(path) if path else module), leaf


def held(names: Iterable[str], parts: Iterable[str] | None) -> set[str]:
    """The parameter ``names`` inside the submodules ``parts`` (qualified names; None: all of them)."""
    if parts is None:
        return set(names)
    prefixes = tuple(f"{part}." for part in parts)
    return {n for n in names if n.startswith(prefixes)}


@torch.no_grad()
def fill_shards(module: torch.nn.Module, dims: ParallelDims, shard_for, device=None,
                parts: Iterable[str] | None = None) -> None:
    """Give every parameter (of the submodules ``parts``, default all) this rank's shard ``shard_for(name, param)``.

    A parameter on the meta device is replaced by a real one (its declarations carried over); any other
    is filled in place; parameters outside ``parts`` are left as they are (on the meta device, they cost
    nothing: another pipeline stage's). ``device``: where materialised parameters go (default: the CPU)."""
    named = dict(module.named_parameters())
    keep = held(named, parts)
    for name, p in named.items():
        if name not in keep:
            continue
        shard = shard_for(name, p)
        if p.is_meta:
            data = shard.to(device=device, dtype=p.dtype).clone(memory_format=torch.contiguous_format)
            real = torch.nn.Parameter(data, requires_grad=p.requires_grad)
            real.__dict__.update(p.__dict__)  # full_init, split dim, weight decay, partial gradient
            owner, leaf = _owner(module, name)
            setattr(owner, leaf, real)
        else:
            p.copy_(shard.to(p.dtype))
    for name, b in module.named_buffers():
        if b.is_meta:
            raise RuntimeError(f"buffer {name} was created on the meta device; create it on the CPU (device='cpu')")


def initialize_parameters(module: torch.nn.Module, seed: int, dims: ParallelDims = SINGLE_PROCESS,
                          device=None, parts: Iterable[str] | None = None) -> None:
    """Fill (or materialise, if on the meta device) every parameter (of ``parts``) from its declared initialiser,
    independent of the layout: the full tensor is drawn from (seed, name), then this rank's shard kept."""
    def shard(name, p):
        init = getattr(p, "full_init", None)
        if init is None:
            raise RuntimeError(f"parameter {name} was created without chimera.parallel.sharding.declare")
        t = torch.empty(full_shape(p, dims), dtype=torch.float32)
        return shard_of(init(t, torch.Generator().manual_seed(_param_seed(seed, name))), p, dims)

    fill_shards(module, dims, shard, device, parts)


@torch.no_grad()
def full_state_dict(module: torch.nn.Module, dims: ParallelDims = SINGLE_PROCESS, of=lambda p: p
                    ) -> dict[str, torch.Tensor]:
    """Full (unsharded) fp32 tensors of every parameter (or of ``of(param)``, e.g. its gradient), on CPU.

    A collective over the TP group (and the EP group, for expert parameters)."""
    out = {}
    for name, p in module.named_parameters():
        t = of(p).detach().float()
        for dim, size, group in ((split_dim(p), dims.tp, dims.tp_group), (expert_dim(p), dims.ep, dims.ep_group)):
            if dim is not None and size > 1:
                if group is None:
                    raise ValueError(f"{name}: gathering a split parameter needs its process group")
                parts = [torch.empty_like(t) for _ in range(size)]
                dist.all_gather(parts, t.contiguous(), group=group)
                t = torch.cat(parts, dim=dim)
        out[name] = t.cpu().clone()
    return out


def load_full_state_dict(module: torch.nn.Module, state: dict[str, torch.Tensor],
                         dims: ParallelDims = SINGLE_PROCESS, device=None, parts: Iterable[str] | None = None) -> None:
    """Copy full tensors into this rank's shards (materialising meta parameters); names and full shapes must
    match exactly."""
    params = dict(module.named_parameters())
    missing, unexpected = sorted(set(params) - set(state)), sorted(set(state) - set(params))
    if missing or unexpected:
        raise ValueError(f"state dict mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for name, p in params.items():
        if state[name].shape != full_shape(p, dims):
            raise ValueError(f"{name}: shape {tuple(state[name].shape)} but the model expects "
                             f"{tuple(full_shape(p, dims))}")
    fill_shards(module, dims, lambda name, p: shard_of(state[name], p, dims), device, parts)
