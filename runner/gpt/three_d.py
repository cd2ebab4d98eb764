"""3D parallelism: pipeline stages whose layers are tensor-parallel, replicated over data-parallel groups.

The pipeline engine (pipeline.py) drives the schedule; each stage is built from the tensor-parallel
pieces (tensor_parallel.py): the vocab-parallel embedding on the first stage, TPBlocks for its layers,
the final LayerNorm and vocab-parallel head and loss on the last. Each tensor-parallel rank exchanges
activations with the rank of the same tp coordinate in the neighbouring stage (the mesh's pp group).
data_parallel.py wraps the whole thing for dp > 1. Sequence parallelism is not combined with the
pipeline here (the spec refuses it).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from runner.gpt.model import KVCache
from runner.gpt.pipeline import PipelineGPT
from runner.gpt.tensor_parallel import TPBlock, TPEmbedding, TPHead, reference_names, shard_index


class TPStage(nn.Module):
    """Module paths mirror TPModel's (embed., h.<i>., head.) so reference names map the same way."""

    def __init__(self, cfg, first: int, last: int, comm, seed: int, style: str, has_embed: bool, has_head: bool):
        super().__init__()
        self.first, self.last = first, last
        self.embed = TPEmbedding(cfg, comm, seed) if has_embed else None
        self.h = nn.ModuleDict({str(i): TPBlock(cfg, i, comm, seed, style) for i in range(first, last)})
        tied = self.embed.wte if self.embed is not None else None
        self.head = TPHead(cfg, comm, seed, tied=tied) if has_head else None

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, start: int = 0) -> torch.Tensor:
        if self.embed is not None:
            x = self.embed(x, start)
        for i in range(self.first, self.last):
            x = self.h[str(i)](x, None if cache is None else cache.layers[i])
        return self.head.local_logits(x) if self.head is not None else x


class ThreeDGPT(PipelineGPT):
    def build_stage(self) -> nn.Module:
        return TPStage(self.config, self.first, self.last, self.mesh.tp, self.spec.seed, self.spec.tp_style,
                       has_embed=self.prev is None, has_head=self.next is None)  # fmt: skip

    def named_shards(self) -> dict[str, nn.Parameter]:
        return reference_names(dict(self.stage.named_parameters(remove_duplicate=False)))

    def shard_index(self, name: str):
        return shard_index(name, self.config, self.mesh.tp.index, self.mesh.tp.size, self.spec.tp_style)

    @property
    def is_output_rank(self) -> bool:
        return self.next is None and self.mesh.tp.index == 0

    def loss(self, out: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.stage.head.loss(out, targets)

    def logits(self, out: torch.Tensor) -> torch.Tensor | None:
        full = self.stage.head.full_logits(out)  # every tp rank takes part in the gather
        return full

    def next_token(self, out: torch.Tensor) -> torch.Tensor:
        return self.stage.head.full_logits(out[:, -1:, :])[:, -1, :].argmax(dim=-1, keepdim=True)

    def tied_weight(self) -> nn.Parameter | None:
        if self.prev is None:
            return self.stage.embed.wte.weight
        if self.next is None:
            return self.stage.head.lm_head.weight
        return None

    def sync_tied_embedding(self) -> None:
        # With pp = 1 the head reuses the embedding module itself: nothing to sum.
        if self.n_stages > 1:
            super().sync_tied_embedding()
