"""ZeRO's layout (runner/gpt/zero.py shards over it): a rank's parameters grouped into flat units, the part of
each reference parameter its shard holds (`Piece`), and the reference elements that part is (`flat_piece_index`).

Layout. A rank's parameters are grouped into units, FSDP's granularity: one per transformer block this rank
holds, and one "outer" unit for the rest (embeddings, final LayerNorm, head; the tied weight once). Each unit
is a flat buffer of its parameters in a fixed order, zero-padded to dp * S elements with S = ceil(Psi_u/dp);
data-parallel rank r owns elements [r*S, (r+1)*S). So a rank holds S_u = ceil(Psi_u/dp) elements of each
unit, and its share exceeds Psi/dp by less than one element per unit (the padding, reported as
`zero_flat_padding_elements`). What each stage keeps between steps (float32 AdamW: 4 bytes a parameter,
4 a gradient, 8 of state -- the paper's mixed-precision 2 + 2 + K=12 with K's master copy folded in):

    stage  parameters      gradients       optimizer state     per step, per unit
    1      4 Psi           4 Psi           8 sum S_u           all-reduce of gradients, all-gather after the step
    2      4 Psi           4 sum S_u       8 sum S_u           reduce-scatter of gradients, all-gather after the step
    3      4 sum S_u       4 sum S_u       8 sum S_u           all-gather before each use (forward, again for
                                                               backward), reduce-scatter of gradients

(plus AdamW's 4-byte step counter per optimized tensor, one per unit). Parameters of stages 1 and 2 are
views into their unit's flat buffer, and the rank's shard is a view of its own slice, so AdamW updates
the shard in place and one all-gather per unit refreshes everyone's copy; no master copy is kept twice.

Verification sees the truth: with stage 1 a rank holds whole parameters and gradients (the inner
strategy's named_shards); with stages 2 and 3 it holds slices, so named_shards() maps each reference name
to a 1-D view of the part of this rank's shard that falls in that parameter, and shard_index() to the
reference elements it holds (a tuple of index tensors, so `ref[index]` is that 1-D slice, vocabulary
padding excluded: it sits at the end of a parameter's flat range, where trim_padding cuts it).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn

from runner.gpt.comm import PendingCollective
from runner.gpt.model import Shard, materialize

BLOCK_NAME = re.compile(r"^(transformer\.h\.\d+)\.")


@dataclass
class Unit:
    """One flat buffer of parameters (a block, or the outer rest) and this rank's slice of it."""

    name: str
    params: list[nn.Parameter]
    offsets: list[int]
    numel: int  # Psi_u, without padding
    shard_numel: int  # S_u = ceil(Psi_u / dp)
    full: torch.Tensor  # dp * S_u elements; under stage 3 its storage exists only while gathered
    shard: nn.Parameter  # S_u elements: what AdamW updates
    module: nn.Module | None = None
    gathered: bool = True
    pending_gather: PendingCollective | None = None
    pending_reduce: PendingCollective | None = None
    reduce_input: torch.Tensor | None = None
    grads_missing: int = 0
    # Backwards that reached this block (its output's gradient arrived) whose parameter gradients are not all
    # in yet. Zero-bubble pipelines run them apart (B: input gradients, W later: weight gradients, with other
    # microbatches' forwards between), and W still reads the weights, so the block stays gathered meanwhile.
    awaiting_weight_grads: int = 0

    @property
    def padded(self) -> int:
        return self.full.numel()


@dataclass
class Piece:
    """The part of reference parameter `name` in this rank's shard: elements [lo, hi) of the parameter's
    flat order, at [lo + offset - r*S, ...) of its unit's shard."""

    unit: Unit
    param: nn.Parameter
    lo: int
    hi: int
    at: int  # where lo sits in unit.shard


def group_parameters(named: dict[str, nn.Parameter]) -> tuple[dict[str, list[nn.Parameter]], dict[int, str]]:
    """Parameters by unit ('transformer.h.3', or 'outer' for the rest), each once (a tied one under its first
    reference name), and that name of each parameter by id."""
    groups: dict[str, list[nn.Parameter]] = {}
    name_of: dict[int, str] = {}
    for name, p in named.items():
        if id(p) in name_of:
            continue
        name_of[id(p)] = name
        m = BLOCK_NAME.match(name)
        groups.setdefault(m.group(1) if m else "outer", []).append(p)
    return groups, name_of


def make_unit(
    name: str,
    params: list[nn.Parameter],
    module: nn.Module | None,
    *,
    n: int,
    r: int,
    shard_only: bool,
    dtype: torch.dtype,
    device: torch.device,
    initial_value: Callable[[nn.Parameter], torch.Tensor],
) -> Unit:
    """The flat buffer of `params` (zero-padded to n * S), each parameter made a view of its part of it, and
    rank r's slice: a copy of its own when `shard_only` (stage 3 keeps only that), else a view AdamW updates
    in place. A parameter still on the meta device gets `initial_value(p)` first."""
    offsets, total = [], 0
    for p in params:
        offsets.append(total)
        total += p.numel()
    per = math.ceil(total / n)
    full = torch.zeros(per * n, dtype=dtype, device=device)
    with torch.no_grad():
        for p, off in zip(params, offsets, strict=True):
            value = initial_value(p) if p.is_meta else p.detach()
            full[off : off + p.numel()].copy_(value.reshape(-1))
            _point_at(p, full[off : off + p.numel()].view(p.shape))
    mine = full[r * per : (r + 1) * per]
    if shard_only:
        shard = nn.Parameter(mine.clone())  # the only copy kept between uses
    else:
        shard = nn.Parameter(torch.empty(0, dtype=full.dtype, device=full.device))
        shard.data = mine  # AdamW updates this rank's slice of the full buffer in place
    return Unit(name, params, offsets, total, per, full, shard, module)


def materialized_value(name: str, p: nn.Parameter, seed: int | None, inner) -> torch.Tensor:
    """The value `materialize` gives parameter `name` left on the meta device (ZeRO-3 built lazily: the rank
    makes one parameter at a time and keeps its shard, never the whole model)."""
    if seed is None:
        raise ValueError("ZeRO: a parameter is still on the meta device and no seed was given to make it")
    holder = root = nn.Module()
    *path, leaf = name.split(".")
    for part in path:  # the reference name as module path, so materialize draws the same values
        child = nn.Module()
        holder.add_module(part, child)
        holder = child
    holder.register_parameter(leaf, p)
    materialize(root, seed, device=inner.device, dtype=inner.dtype, config=inner.config)
    return holder._parameters[leaf].detach()


def rank_pieces(named: dict[str, nn.Parameter], unit_of: dict[int, Unit], r: int) -> dict[str, Piece]:
    """Reference name -> the part of that parameter in rank r's shard of its unit (names with none left out)."""
    out = {}
    for name, p in named.items():
        u = unit_of[id(p)]
        off = u.offsets[[id(q) for q in u.params].index(id(p))]
        start, stop = r * u.shard_numel, (r + 1) * u.shard_numel
        lo, hi = max(off, start), min(off + p.numel(), stop)
        if lo < hi:
            out[name] = Piece(u, p, lo - off, hi - off, lo - start)
    return out


def _point_at(p: nn.Parameter, view: torch.Tensor) -> None:
    """Make parameter p hold `view` (a slice of its unit's flat buffer), keeping the same Python object --
    its Shard record, marks, hooks and the modules and engine that reference it.

    set_data rather than a view, so the parameter keeps its own version counter and writing the flat buffer
    (an all-gather) never trips autograd's check on tensors it saved. A meta parameter cannot take CPU or
    CUDA data that way; swap_tensors exchanges the whole tensor (attributes travel with it, so they are put
    back)."""
    if not p.is_meta:
        p.data = view
        return
    attributes = dict(p.__dict__)
    real = nn.Parameter(torch.empty(0, dtype=view.dtype, device=view.device), requires_grad=p.requires_grad)
    real.data = view
    torch.utils.swap_tensors(p, real)
    p.__dict__.update(attributes)


def block_modules(inner) -> dict[str, nn.Module]:
    """Reference block name ('transformer.h.3') -> its module, from the inner strategy's model(s)."""
    out: dict[str, nn.Module] = {}
    roots = [v for v in vars(inner).values() if isinstance(v, nn.Module)]
    roots += [m for v in vars(inner).values() if isinstance(v, (list, tuple)) for m in v if isinstance(m, nn.Module)]
    for root in roots:
        for name, module in root.named_modules():
            if re.fullmatch(r"transformer\.h\.\d+", name):
                out[name] = module
    return out


def flat_piece_index(shard: Shard, lo: int, hi: int) -> tuple[torch.Tensor, ...]:
    """Index into the reference parameter picking elements [lo, hi) of a rank's parameter in flat order
    (the parameter being `reference[shard.index]`, maybe with zero padding rows after it): `ref[index]`
    is then the 1-D slice those elements hold; padding elements have no reference and are left out."""
    ref_shape = shard.reference_shape
    index = shard.index
    if index is None:
        held = tuple(ref_shape)
    elif isinstance(index, torch.Tensor):
        held = (len(index), *ref_shape[1:])
    else:
        held = tuple(len(range(*s.indices(n))) for s, n in zip(index, ref_shape, strict=False))
        held += tuple(ref_shape[len(index) :])
    valid = math.prod(held)  # padding rows come after every held element in flat order
    pos = torch.arange(lo, max(lo, min(hi, valid)))
    coords = torch.unravel_index(pos, held)
    if index is None:
        return tuple(coords)
    if isinstance(index, torch.Tensor):
        return (index.cpu()[coords[0]], *coords[1:])
    mapped = []
    for d, c in enumerate(coords):
        if d < len(index):
            start, _, step = index[d].indices(ref_shape[d])
            mapped.append(start + c * step)
        else:
            mapped.append(c)
    return tuple(mapped)
