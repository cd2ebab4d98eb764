"""'Model parallelism' as the guide draws it: consecutive layers per rank, the whole batch at once.

Rank s of the pipeline group runs layers [s*L/p, (s+1)*L/p): it receives the activations of the
whole batch from rank s-1, runs its layers and sends the result on; the backward pass walks the
same chain in reverse with the activation gradients. No microbatches, so only one rank is busy at
a time; that idleness is what the pipeline strategy's microbatching removes. With p = 1 this is the
single-device model, which is how strategy 'single' runs.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from runner.gpt.mesh import Mesh
from runner.gpt.model import GPTStage, KVCache
from runner.gpt.strategy import ParallelGPT
from runner.spec import RunSpec


def stage_layers(n_layer: int, n_stages: int, stage: int) -> tuple[int, int]:
    """[first, last) layer ids of `stage` when n_layer splits evenly over n_stages."""
    if n_layer % n_stages:
        raise ValueError(f"n_layer {n_layer} does not split over {n_stages} stages")
    per = n_layer // n_stages
    return stage * per, (stage + 1) * per


class LayerSplitGPT(ParallelGPT):
    def __init__(self, spec: RunSpec, mesh: Mesh, device: torch.device, dtype: torch.dtype):
        config = spec.model_config()
        super().__init__(config, mesh, device, dtype)
        self.stage_id, self.n_stages = mesh.coord.pp, mesh.pp_size
        first, last = stage_layers(config.n_layer, self.n_stages, self.stage_id)
        self.stage = GPTStage(
            config, first, last, seed=spec.seed, has_embed=mesh.is_first_stage, has_head=mesh.is_last_stage
        ).to(device=device, dtype=dtype)
        # One stage and no tied-gradient sync after backward: every gradient is final once accumulated,
        # which lets data parallelism start reducing it during backward.
        self.single_backward_pass = self.n_stages == 1
        self.prev = mesh.stage_rank(self.stage_id - 1) if not mesh.is_first_stage else None
        self.next = mesh.stage_rank(self.stage_id + 1) if not mesh.is_last_stage else None

    def named_shards(self) -> dict[str, nn.Parameter]:
        return dict(self.stage.named_parameters(remove_duplicate=False))

    @property
    def is_output_rank(self) -> bool:
        return self.mesh.is_last_stage

    def _hidden_shape(self, idx: torch.Tensor) -> tuple[int, int, int]:
        return (idx.shape[0], idx.shape[1], self.config.n_embd)

    def _stage_input(self, idx: torch.Tensor, start: int = 0) -> torch.Tensor:
        if self.prev is None:
            return idx
        return self.mesh.pp.recv(self._hidden_shape(idx), self.dtype, self.device, self.prev)

    @torch.no_grad()
    def forward_logits(self, idx: torch.Tensor) -> torch.Tensor | None:
        out = self.stage(self._stage_input(idx))
        if self.next is not None:
            self.mesh.pp.send(out, self.next)
            return None
        return out

    def forward_backward(self, idx: torch.Tensor, targets: torch.Tensor) -> float | None:
        x = self._stage_input(idx)
        if self.prev is not None:
            x.requires_grad_(True)
        out = self.stage(x)
        loss_value = None
        if self.next is None:
            loss = F.cross_entropy(out.flatten(0, 1).float(), targets.flatten())
            loss.backward()
            loss_value = loss.item()
        else:
            self.mesh.pp.send(out.detach(), self.next)
            grad = self.mesh.pp.recv(tuple(out.shape), out.dtype, self.device, self.next)
            out.backward(grad)
        if self.prev is not None:
            self.mesh.pp.send(x.grad, self.prev)
        self.sync_tied_embedding()
        return loss_value

    def sync_tied_embedding(self) -> None:
        """First and last stage each hold a copy of the tied wte/lm_head: sum their gradients."""
        if self.mesh.embed is None:
            return
        mod = self.stage.transformer.wte if self.mesh.is_first_stage else self.stage.lm_head
        if mod.weight.grad is not None:
            self.mesh.embed.all_reduce(mod.weight.grad)

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, new_tokens: int) -> torch.Tensor | None:
        cache = KVCache.empty(self.config.n_layer)
        tokens, pos, out = idx, 0, [idx]
        for i in range(new_tokens):
            x = (
                tokens
                if self.prev is None
                else self.mesh.pp.recv(self._hidden_shape(tokens), self.dtype, self.device, self.prev)
            )
            y = self.stage(x, cache=cache, start=pos)
            pos += tokens.shape[1]
            if self.next is not None:
                self.mesh.pp.send(y, self.next)
            else:
                nxt = y[:, -1, :].argmax(dim=-1, keepdim=True)
                out.append(nxt)
            if i + 1 == new_tokens:
                break
            # The next input token travels from the last stage back to the first.
            if self.n_stages == 1:
                tokens = nxt
            elif self.next is None:
                self.mesh.pp.send(nxt, self.mesh.stage_rank(0))
            elif self.prev is None:
                tokens = self.mesh.pp.recv(
                    (idx.shape[0], 1), torch.long, self.device, self.mesh.stage_rank(self.n_stages - 1)
                )
            if self.prev is not None:
                tokens = torch.empty(idx.shape[0], 1, dtype=torch.long)  # only its shape matters past stage 0
        return torch.cat(out, dim=1) if self.next is None else None
