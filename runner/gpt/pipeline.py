"""Pipeline parallelism: stages of consecutive layers fed with microbatches, GPipe or 1F1B, with timelines.

Stage s holds layers [s*L/p, (s+1)*L/p) (embedding on the first, LM head on the last). Activations
go forward and their gradients backward by point-to-point messages between neighbours. Sends are
asynchronous (isend, waited for at the end of the step) and receives blocking, so two neighbours
sending to each other at once never deadlock. The schedules are plain functions over two callbacks:
- `gpipe`: every microbatch's forward, then every backward (stores m activations);
- `one_f_one_b`: p - s - 1 warm-up forwards, then one forward / one backward, then the remaining
  backwards (stores at most p - s activations).
Each stage records (microbatch, phase, start, end) spans relative to the step start; `recv_wait` is
time blocked waiting for a neighbour, which is what the pipeline bubble is made of. Stored activations
are counted two ways: microbatches in flight (forward done, backward not yet) and the bytes autograd
saved for them (a saved-tensors hook sums the distinct storages each microbatch's forward keeps).
`forward` and `generate` run microbatches through the stages as an assembly line; in `generate`
every microbatch of requests keeps its own KV cache.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F

from runner.gpt.comm import PendingCollective
from runner.gpt.mesh import Mesh
from runner.gpt.model import GPTStage, KVCache
from runner.gpt.strategy import ParallelGPT
from runner.spec import RunSpec


def gpipe(n_micro: int, forward: Callable[[int], None], backward: Callable[[int], None]) -> None:
    """All forwards, then all backwards (in reverse order, as GPipe does)."""
    for i in range(n_micro):
        forward(i)
    for i in reversed(range(n_micro)):
        backward(i)


def one_f_one_b(
    n_micro: int, n_stages: int, stage: int, forward: Callable[[int], None], backward: Callable[[int], None]
) -> None:
    """Warm-up forwards (p - stage - 1), steady one-forward-one-backward, cool-down backwards."""
    warmup = min(n_stages - stage - 1, n_micro)
    for i in range(warmup):
        forward(i)
    for i in range(n_micro - warmup):
        forward(warmup + i)
        backward(i)
    for i in range(n_micro - warmup, n_micro):
        backward(i)


SCHEDULES = {"gpipe": gpipe, "1f1b": one_f_one_b}


def stage_layers(n_layer: int, n_stages: int, stage: int) -> tuple[int, int]:
    """[first, last) layer ids of `stage` when n_layer splits evenly over n_stages."""
    if n_layer % n_stages:
        raise ValueError(f"n_layer {n_layer} does not split over {n_stages} stages")
    per = n_layer // n_stages
    return stage * per, (stage + 1) * per


class PipelineGPT(ParallelGPT):
    """One stage of the pipeline. Subclasses (3D) replace build_stage / run_stage / loss / logits."""

    def __init__(self, spec: RunSpec, mesh: Mesh, device: torch.device, dtype: torch.dtype):
        super().__init__(spec.model_config(), mesh, device, dtype)
        self.spec = spec
        self.stage_id, self.n_stages = mesh.coord.pp, mesh.pp_size
        self.n_micro = self.microbatches(spec)
        self.schedule = spec.schedule
        self.first, self.last = stage_layers(self.config.n_layer, self.n_stages, self.stage_id)
        self.prev = mesh.stage_rank(self.stage_id - 1) if not mesh.is_first_stage else None
        self.next = mesh.stage_rank(self.stage_id + 1) if not mesh.is_last_stage else None
        self.stage = self.build_stage().to(device=device, dtype=dtype)
        self._spans: list[dict] = []
        self._sends: list[PendingCollective] = []
        self.max_inflight = 0
        self.peak_activation_bytes = 0
        self.microbatch_activation_bytes = 0
        self._param_storages: set[int] | None = None
        self.step_start = time.perf_counter()
        # One stage, one microbatch: each gradient is final once accumulated, so data parallelism may
        # start reducing it during backward.
        self.single_backward_pass = self.n_stages == 1 and self.n_micro == 1

    def microbatches(self, spec: RunSpec) -> int:
        return spec.microbatches

    # ---- what a stage is (overridden by 3D) --------------------------------------------------
    def build_stage(self) -> nn.Module:
        return GPTStage(self.config, self.first, self.last, seed=self.spec.seed,
                        has_embed=self.prev is None, has_head=self.next is None)  # fmt: skip

    def run_stage(self, x: torch.Tensor, cache: KVCache | None = None, start: int = 0) -> torch.Tensor:
        return self.stage(x, cache=cache, start=start)

    def loss(self, out: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(out.flatten(0, 1).float(), targets.flatten())

    def logits(self, out: torch.Tensor) -> torch.Tensor:
        return out

    def next_token(self, out: torch.Tensor) -> torch.Tensor:
        return out[:, -1, :].argmax(dim=-1, keepdim=True)

    def tied_weight(self) -> nn.Parameter | None:
        """This stage's copy of the tied embedding / LM head weight, if it holds one."""
        if self.prev is None:
            return self.stage.transformer.wte.weight
        if self.next is None:
            return self.stage.lm_head.weight
        return None

    def named_shards(self) -> dict[str, nn.Parameter]:
        return dict(self.stage.named_parameters(remove_duplicate=False))

    @property
    def is_output_rank(self) -> bool:
        return self.next is None

    # ---- bookkeeping ------------------------------------------------------------------------
    def begin_step(self, step: int, start: float) -> None:
        super().begin_step(step, start)
        self._spans = []

    def take_spans(self) -> list[dict]:
        spans, self._spans = self._spans, []
        return spans

    def _span(self, microbatch: int, phase: str, start: float, end: float) -> None:
        self._spans.append({"stage": self.stage_id, "microbatch": microbatch, "phase": phase,
                            "start": start - self.step_start, "end": end - self.step_start})  # fmt: skip

    def _recv(self, shape, dtype, src: int, microbatch: int) -> torch.Tensor:
        start = time.perf_counter()
        t = self.mesh.pp.recv(shape, dtype, self.device, src)
        self._span(microbatch, "recv_wait", start, time.perf_counter())
        return t

    def _send(self, t: torch.Tensor, dst: int, microbatch: int) -> None:
        start = time.perf_counter()
        self._sends.append(self.mesh.pp.isend(t, dst))
        self._span(microbatch, "send", start, time.perf_counter())

    def _finish_sends(self) -> None:
        for pending in self._sends:
            pending.wait()
        self._sends = []

    def _hidden_shape(self, mb: torch.Tensor) -> tuple[int, ...]:
        return (mb.shape[0], mb.shape[1], self.config.n_embd)

    @contextmanager
    def _saving_into(self, storages: dict[int, int]) -> Iterator[None]:
        """Record, for every tensor autograd saves meanwhile, its storage and size in `storages` (by address).
        Parameters are skipped: they live anyway; what a microbatch in flight costs is its activations."""
        if self._param_storages is None:  # parameters keep their storage (optimizers update in place)
            self._param_storages = {q.untyped_storage().data_ptr() for q in self.stage.parameters()}
        params = self._param_storages

        def pack(t: torch.Tensor) -> torch.Tensor:
            storage = t.untyped_storage()
            if storage.data_ptr() not in params:
                storages.setdefault(storage.data_ptr(), storage.nbytes())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            yield

    def figures(self) -> dict:
        p, m = self.n_stages, self.n_micro
        return {
            "max_inflight_microbatches": self.max_inflight,
            "peak_activation_bytes": self.peak_activation_bytes,
            "activation_bytes_per_microbatch": self.microbatch_activation_bytes,
            "bubble_fraction_theory": (p - 1) / (m + p - 1),
        }

    # ---- workloads --------------------------------------------------------------------------
    def forward_backward(self, idx: torch.Tensor, targets: torch.Tensor) -> float | None:
        mbs, tgts = idx.chunk(self.n_micro), targets.chunk(self.n_micro)
        inputs: dict[int, torch.Tensor] = {}
        outputs: dict[int, torch.Tensor] = {}
        total_loss = 0.0
        inflight = 0
        saved: dict[int, int] = {}  # bytes autograd keeps for each microbatch in flight

        def forward(i: int) -> None:
            nonlocal total_loss, inflight
            if self.prev is None:
                x = mbs[i]
            else:
                x = self._recv(self._hidden_shape(mbs[i]), self.dtype, self.prev, i).requires_grad_(True)
            start = time.perf_counter()
            storages: dict[int, int] = {}
            with self._saving_into(storages):
                out = self.run_stage(x)
                if self.next is None:
                    # Each microbatch's mean loss over m microbatches: the gradients of the global mean.
                    out = self.loss(out, tgts[i]) / self.n_micro
            if self.next is None:
                total_loss += out.item()
            self._span(i, "forward", start, time.perf_counter())
            inputs[i], outputs[i] = x, out
            inflight += 1
            self.max_inflight = max(self.max_inflight, inflight)
            saved[i] = sum(storages.values())
            self.microbatch_activation_bytes = max(self.microbatch_activation_bytes, saved[i])
            self.peak_activation_bytes = max(self.peak_activation_bytes, sum(saved.values()))
            if self.next is not None:
                self._send(out.detach(), self.next, i)

        def backward(i: int) -> None:
            nonlocal inflight
            out = outputs.pop(i)
            grad = None if self.next is None else self._recv(tuple(out.shape), out.dtype, self.next, i)
            start = time.perf_counter()
            out.backward(grad)
            self._span(i, "backward", start, time.perf_counter())
            x = inputs.pop(i)
            inflight -= 1
            del saved[i]
            if self.prev is not None:
                self._send(x.grad, self.prev, i)

        if self.schedule == "gpipe":
            gpipe(self.n_micro, forward, backward)
        else:
            one_f_one_b(self.n_micro, self.n_stages, self.stage_id, forward, backward)
        self._finish_sends()
        self.sync_tied_embedding()
        return total_loss if self.next is None else None

    def sync_tied_embedding(self) -> None:
        weight = self.tied_weight()
        if self.mesh.embed is not None and weight is not None and weight.grad is not None:
            # The last stage gets here while the first one still runs its last backwards: that wait is
            # pipeline bubble (idle), not the all-reduce's communication time.
            self.mesh.embed.wait_for_peers()
            self.mesh.embed.all_reduce(weight.grad)

    @torch.no_grad()
    def forward_logits(self, idx: torch.Tensor) -> torch.Tensor | None:
        outs = []
        for i, mb in enumerate(idx.chunk(self.n_micro)):
            x = mb if self.prev is None else self._recv(self._hidden_shape(mb), self.dtype, self.prev, i)
            start = time.perf_counter()
            out = self.run_stage(x)
            self._span(i, "forward", start, time.perf_counter())
            if self.next is not None:
                self._send(out, self.next, i)
            else:
                outs.append(self.logits(out))
        self._finish_sends()
        return torch.cat(outs) if self.next is None else None

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, new_tokens: int) -> torch.Tensor | None:
        mbs = idx.chunk(self.n_micro)
        caches = [KVCache.empty(self.config.n_layer) for _ in mbs]
        tokens = list(mbs)
        pos = [0] * len(mbs)
        produced: list[list[torch.Tensor]] = [[mb] for mb in mbs]
        first_rank, last_rank = self.mesh.stage_rank(0), self.mesh.stage_rank(self.n_stages - 1)
        for t in range(new_tokens):
            for i, mb in enumerate(mbs):
                width = tokens[i].shape[1] if t == 0 else 1
                if self.prev is None:
                    if t > 0 and self.n_stages > 1:  # the token the last stage picked one round ago
                        tokens[i] = self._recv((mb.shape[0], 1), torch.long, last_rank, i)
                    x = tokens[i]
                else:
                    x = self._recv((mb.shape[0], width, self.config.n_embd), self.dtype, self.prev, i)
                start = time.perf_counter()
                out = self.run_stage(x, cache=caches[i], start=pos[i])
                self._span(i, "forward", start, time.perf_counter())
                pos[i] += width
                if self.next is not None:
                    self._send(out, self.next, i)
                else:
                    nxt = self.next_token(out)
                    produced[i].append(nxt)
                    if self.n_stages == 1:
                        tokens[i] = nxt
                    elif t + 1 < new_tokens:
                        self._send(nxt, first_rank, i)
        self._finish_sends()
        if self.next is None:
            return torch.cat([torch.cat(parts, dim=1) for parts in produced])
        return None
