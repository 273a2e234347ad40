"""Expert parallelism: the experts of a MoE sublayer spread over the ranks of an expert-parallel group.

Rank ``r`` of ``R`` holds experts ``[r E / R, (r + 1) E / R)``. Every rank routes its own tokens and groups
the (token, slot) assignments by expert (``chimera.models.channels.moe.dispatch``); then

1. the per-expert row counts are all-gathered (``[R, E]``: who sends how many rows to which expert);
2. ``to_experts``: one all-to-all sends each rank the rows of its experts, which it reorders from
   ``[source rank][its expert]`` to ``[its expert][source rank]`` so that each expert's rows are contiguous;
3. the experts run on their rows;
4. ``from_experts``: the reverse reordering and all-to-all bring every output row back to the rank and
   position it came from, where ``combine`` weights and sums them onto the tokens.

Both all-to-alls are differentiable (the backward of one is the other with the splits swapped), so an
expert's weight gradient is the sum over every rank's tokens routed to it. With ``R = 1`` nothing moves.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from chimera.parallel.dims import ParallelDims


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rows, send_splits, recv_splits, group):
        ctx.splits, ctx.group = (send_splits, recv_splits), group
        out = rows.new_empty((sum(recv_splits), *rows.shape[1:]))
        dist.all_to_all_single(out, rows.contiguous(), output_split_sizes=recv_splits,
                               input_split_sizes=send_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        send_splits, recv_splits = ctx.splits
        back = grad.new_empty((sum(send_splits), *grad.shape[1:]))
        dist.all_to_all_single(back, grad.contiguous(), output_split_sizes=send_splits,
                               input_split_sizes=recv_splits, group=ctx.group)
        return back, None, None, None


@dataclass
class ExpertRows:
    """This rank's experts' rows after the exchange, and how to send the outputs back."""

    rows: torch.Tensor  # [n, d] grouped by local expert, then by source rank
    counts: list[int]  # rows of each local expert
    order: torch.Tensor | None  # received position of each row in ``rows`` (None: nothing moved)
    send_splits: list[int]
    recv_splits: list[int]


def to_experts(grouped: torch.Tensor, counts: torch.Tensor, dims: ParallelDims) -> ExpertRows:
    """``grouped [N, d]``: this rank's assignments grouped by (global) expert, ``counts [E]`` rows per expert.
    Returns the rows every rank sends to this rank's experts, grouped by local expert."""
    if dims.ep == 1:
        return ExpertRows(grouped, counts.tolist(), None, [], [])
    if dims.ep_group is None:
        raise RuntimeError(f"expert parallelism over {dims.ep} ranks needs the expert-parallel process group")
    num_experts = counts.shape[0]
    local = dims.local_experts(num_experts)
    everyone = counts.new_empty((dims.ep * num_experts,))
    dist.all_gather_into_tensor(everyone, counts.contiguous(), group=dims.ep_group)  # [source, expert]
    everyone = everyone.view(dims.ep, dims.ep, local)  # [source, owner, local expert]
    send_splits = everyone[dims.ep_rank].sum(-1).tolist()  # rows I send to each owner
    mine = everyone[:, dims.ep_rank]  # [source, local expert]: rows each source sends to each of my experts
    recv_splits = mine.sum(-1).tolist()
    received = _AllToAll.apply(grouped, send_splits, recv_splits, dims.ep_group)  # [source][local expert]
    # position of each received row, listed expert-major: for expert e, the rows from source 0, 1, ...
    start = (mine.flatten().cumsum(0) - mine.flatten()).view_as(mine)  # first row of (source, expert)
    order = torch.cat([torch.arange(int(n), device=grouped.device) + int(first)
                       for first, n in zip(start.t().flatten().tolist(), mine.t().flatten().tolist())])
    return ExpertRows(received.index_select(0, order), mine.sum(0).tolist(), order, send_splits, recv_splits)


def from_experts(outputs: torch.Tensor, routed: ExpertRows, dims: ParallelDims) -> torch.Tensor:
    """The experts' outputs (rows as in ``routed.rows``) back on the ranks and in the order they came from."""
    if routed.order is None:
        return outputs
    inverse = torch.empty_like(routed.order)
    inverse[routed.order] = torch.arange(routed.order.numel(), device=routed.order.device)
    received_order = outputs.index_select(0, inverse)  # row i of what was received, again at position i
    return _AllToAll.apply(received_order, routed.recv_splits, routed.send_splits, dims.ep_group)
