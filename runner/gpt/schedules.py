"""The split backward of ZB-H1 (runner/job/schedule_ops.py has the schedules): B, the input gradient alone, then W.

`input_grad_pass` / `weight_grad_pass` follow torch.distributed.pipelining's `stage_backward_input` /
`stage_backward_weight` (torch/distributed/pipelining/_backward.py): walking the autograd graph from the
chunk's output, find for each parameter the nodes where its branch leaves the path to the input (e.g. the
matmul of a Linear); B asks autograd for the input's gradient only, keeping the graph and recording, with
pre-hooks, the gradients that arrive at those nodes; W then runs each such node again from its recorded
gradient to the parameters alone. So W computes the weight gradients once and never the activation
gradients again. One autograd call per group of parameters sharing branch points: a single call from every
branch point at once would also run the activation path between them again. Under activation
checkpointing each call is its own graph task, so a checkpointed block is recomputed by each W call that
reaches it (correct, but more recompute than a whole backward's one).

CUDA: B and W are ordinary autograd calls on the current stream, in the order the schedule issues them;
the recorded gradients are tensors on that stream, so W needs no event or synchronisation to read them.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Any

import torch
from torch.autograd.graph import GradientEdge, Node


def _node_of(t: torch.Tensor) -> Node | None:
    """t's grad_fn, or for a leaf its gradient accumulator (made on demand through a view, as torch does)."""
    if t.grad_fn is not None:
        return t.grad_fn
    if t.requires_grad:
        return t.view_as(t).grad_fn.next_functions[0][0]
    return None


def _users(root: Node) -> dict[Node, list[Node]]:
    """For every node reachable from root: the nodes that feed it their gradient (edges reversed)."""
    users: dict[Node, list[Node]] = collections.defaultdict(list)
    seen, queue = {root}, collections.deque([root])
    while queue:
        node = queue.popleft()
        for nxt, _ in node.next_functions:
            if nxt is not None:
                users[nxt].append(node)
                if nxt not in seen:
                    seen.add(nxt)
                    queue.append(nxt)
    return users


def _upwards(starts: list[Node], users: dict[Node, list[Node]], stop: set[Node]) -> tuple[set[Node], set[Node]]:
    """Nodes reached from `starts` towards the output (not entering `stop`), and the `stop` nodes met."""
    closure, met, queue = set(starts), set(), collections.deque(starts)
    while queue:
        for user in users[queue.popleft()]:
            if user in stop:
                met.add(user)
            elif user not in closure:
                closure.add(user)
                queue.append(user)
    return closure, met


@dataclass
class WeightGroup:
    """Parameters whose gradients flow through the same nodes of the input's path, and what reached them."""

    params: list[torch.Tensor]
    nodes: list[Node]
    grads: list[tuple[torch.Tensor | None, ...] | None]


def input_grad_pass(
    out: torch.Tensor, grad: torch.Tensor | None, x: torch.Tensor, params: list[torch.Tensor]
) -> tuple[torch.Tensor, list[WeightGroup]]:
    """B: the gradient of `out` (grad: its incoming gradient; None for a scalar loss) with respect to the
    chunk input `x` only; the graph is kept, and what arrives at each parameter's branch point recorded."""
    root = out.grad_fn
    users = _users(root)
    input_path, _ = _upwards([_node_of(x)], users, set())
    groups: dict[frozenset, WeightGroup] = {}
    for p in params:
        acc = _node_of(p)
        if acc not in users:  # not used by this chunk's graph (e.g. a tied weight used elsewhere)
            continue
        _, met = _upwards([acc], users, input_path)
        if not met:  # its gradient would not pass through B at all: W would lose it
            raise RuntimeError("a parameter's gradient does not meet the input's path; run the full backward")
        key = frozenset(met)
        group = groups.setdefault(key, WeightGroup([], list(met), [None] * len(met)))
        group.params.append(p)
    handles = []
    for group in groups.values():
        for k, node in enumerate(group.nodes):

            def record(grad_outputs: tuple, group: WeightGroup = group, k: int = k) -> None:
                group.grads[k] = tuple(g.detach() if g is not None else None for g in grad_outputs)

            handles.append(node.register_prehook(record))
    try:
        (dx,) = torch.autograd.grad(out, x, grad_outputs=grad, retain_graph=True)
    finally:
        for h in handles:
            h.remove()
    return dx, list(groups.values())


def weight_grad_pass(groups: list[WeightGroup]) -> None:
    """W: from what B recorded at each branch point, the parameters' gradients alone, accumulated into .grad.
    The graph is freed as it goes (each branch point is run once).
    Where a group's gradient enters through several nodes, one of which lies behind another, each node is
    held to its recorded gradient so nothing is counted twice (torch's clamp)."""
    for group in groups:
        edges, grads = [], []
        for node, recorded in zip(group.nodes, group.grads, strict=True):
            for i, g in enumerate(recorded or ()):
                if g is not None:
                    edges.append(GradientEdge(node, i))
                    grads.append(g)
        if not edges:
            continue
        handles: list[Any] = []
        if len(group.nodes) > 1:
            for node, recorded in zip(group.nodes, group.grads, strict=True):
                handles.append(node.register_prehook(lambda _g, rec=recorded: rec))
        try:
            # Accumulated by autograd itself (AccumulateGrad), so gradient hooks fire as in a whole backward:
            # ZeRO reduces a unit's gradients from its parameters' post-accumulate-grad hooks.
            torch.autograd.backward(edges, grad_tensors=grads, inputs=group.params)
        finally:
            for h in handles:
                h.remove()
