"""Where this rank holds each parameter's fp32 master weights and AdamW moments, whatever DeepSpeed's optimizer.

A checkpoint stores logical tensors (``chimera.trainer.tensor_store``); a rank reads and writes the part it holds.
That part is a ``Fragment``: a contiguous flat range of the parameter shard this rank's model holds (its
tensor- and expert-parallel slice), with views of its master weights and moments:

* no ZeRO, fp32 (the optimizer steps the model's own parameters): the whole shard, on every data-parallel
  replica (one replica writes it); no ZeRO, bf16: the same, from the fp32 copies DeepSpeed's unfused
  mixed-precision optimizer steps;
* ZeRO-1/2, and bf16 without ZeRO (DeepSpeed's ``BF16_Optimizer``): each rank's partition of the flattened
  parameters, the fragment DeepSpeed links to each parameter (``param._hp_mapping``);
* ZeRO-3: each rank's partition of every parameter (``param.ds_tensor``), ``[r n, (r + 1) n)`` of its
  flattened elements (``n`` the padded partition size).

AdamW's state is created lazily by its first step; ``create_state`` makes it (zeros, and the step count)
so that a resumed run's moments can be filled in before that.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

MOMENTS = ("exp_avg", "exp_avg_sq")  # AdamW's state, besides its step count


@dataclass
class Fragment:
    name: str  # the parameter's logical name
    param: torch.nn.Parameter  # the model's parameter (its shard on this rank)
    start: int  # the flat range of the shard this rank holds the master weights and moments of
    stop: int
    master: Callable[[], torch.Tensor]  # -> fp32 1-D view of the master weights of [start, stop)
    moment: Callable[[str], torch.Tensor]  # kind -> fp32 1-D view of that moment over [start, stop)
    replicated: bool  # every data-parallel replica holds it (no ZeRO); else this rank alone (in its ZeRO group)


def base_optimizer(ds_engine) -> torch.optim.Optimizer:
    """The torch optimizer that steps: DeepSpeed's ZeRO and bf16 optimizers wrap one as ``.optimizer``."""
    opt = ds_engine.optimizer
    return getattr(opt, "optimizer", opt)


def fragments(ds_engine, named: dict[str, torch.nn.Parameter]) -> list[Fragment]:
    """This rank's fragment of every parameter in ``named`` (logical name -> parameter) that has one."""
    out = []
    stage3 = ds_engine.zero_optimization_stage() == 3
    opt, state = ds_engine.optimizer, base_optimizer(ds_engine).state
    copies = None
    if hasattr(opt, "fp16_groups") and hasattr(opt, "fp32_groups"):  # DeepSpeed's unfused mixed-precision optimizer
        copies = {id(lp): hp for lps, hps in zip(opt.fp16_groups, opt.fp32_groups) for lp, hp in zip(lps, hps)}
    for name, p in named.items():
        if stage3:
            out.append(_stage3_fragment(opt, name, p))
        elif copies is not None:  # bf16 without ZeRO: full fp32 copies of the parameters, stepped
            copy = copies[id(p)]
            out.append(Fragment(name, p, 0, p.numel(), master=lambda c=copy: c.data.view(-1),
                                moment=lambda kind, c=copy: state[c][kind].view(-1), replicated=True))
        elif hasattr(p, "_hp_mapping"):
            mapping = p._hp_mapping
            if mapping is None:  # no element of this parameter in this rank's partition
                continue
            start = mapping.lp_fragment_address.start
            out.append(Fragment(name, p, start, start + mapping.lp_fragment_address.numel,
                                master=mapping.get_hp_fragment,
                                moment=mapping.get_hp_fragment, replicated=False))
        else:  # the optimizer steps the parameter itself
            out.append(Fragment(name, p, 0, p.numel(), master=lambda p=p: p.data.view(-1),
                                moment=lambda kind, p=p: state[p][kind].view(-1), replicated=True))
    return out


def _stage3_fragment(opt, name: str, p) -> Fragment:
    rank = dist.get_rank(group=p.ds_process_group)
    size = p.partition_numel()
    start = min(rank * size, p.ds_numel)
    stop = min(start + size, p.ds_numel)

    def view(kind=None):
        return opt._get_fp32_opt_state_partition(p, release_swap_buffers=False, optim_state_key=kind)[0][
            : stop - start]

    return Fragment(name, p, start, stop, master=view, moment=view, replicated=False)


def create_state(ds_engine, steps: int) -> None:
    """AdamW's per-tensor state as its first step would create it, zeros, with ``steps`` steps taken; then
    linked to the parameters' fragments (ZeRO-1/2 and bf16 link them after the first step)."""
    opt = base_optimizer(ds_engine)
    for t in stepped_tensors(ds_engine):
        state = opt.state[t]
        state["step"] = torch.tensor(float(steps))
        for kind in MOMENTS:
            if kind not in state:
                state[kind] = torch.zeros_like(t, memory_format=torch.preserve_format)
    link_state(ds_engine)


def stepped_tensors(ds_engine) -> list[torch.Tensor]:
    """The tensors AdamW steps: the parameters, or DeepSpeed's fp32 (flat, partitioned) master tensors."""
    flat = getattr(ds_engine.optimizer, "fp32_partitioned_groups_flat", None)  # ZeRO-3 swaps these in per step
    return flat if flat is not None else [t for g in base_optimizer(ds_engine).param_groups for t in g["params"]]


def link_state(ds_engine) -> None:
    """Point every parameter's fragment at its moments (ZeRO-1/2 and bf16). DeepSpeed links them once, after the
    first parameter group's first step, when later groups have no state yet: relinked here before use."""
    link = getattr(ds_engine.optimizer, "_lazy_init_hp_params_optimizer_state", None)
    if link is not None:
        ds_engine.optimizer._hp_optimizer_states_linked = False
        link()


def steps_taken(ds_engine) -> int:
    """The optimizer's step count (AdamW's bias correction)."""
    for state in base_optimizer(ds_engine).state.values():
        if "step" in state:
            return int(state["step"])
    return 0
