"""The pipeline's point-to-point traffic cannot deadlock, checked on the batches the real code issues.

Every stage of a pipeline is built as the job builds it (runner/gpt/build.py: the real engine, its
schedules and StageLinks) and runs in this one process, with a communicator that records each batch it is handed and each wait instead of sending.
The recorded programs are then replayed in a model of the transport that is stricter than NCCL and
gloo: no buffering at all (a send completes only when its receive is posted and vice versa), the
batches of one rank on one communicator run one after another (NCCL runs a communicator's
point-to-point operations in order on one stream), and a rank issues nothing more while it waits for
a batch (its host blocks; on NCCL the host would run ahead and post more, which only helps).

The model is shown to be strict enough: the same programs with every send started on its own before
the receive that follows it -- the previous isend + recv code -- deadlock in 1F1B, as they do on NCCL
once activations exceed its buffers.
"""

from __future__ import annotations

from collections import defaultdict, deque
from dataclasses import dataclass, field

import pytest
import torch

from runner.gpt.build import build_parallel_gpt
from runner.gpt.comm import CommStats, GroupComm, P2PBatch
from runner.gpt.mesh import Mesh
from runner.spec.run_spec import RunSpec


@dataclass
class Batch:
    rank: int
    comm: str
    sends: list[int]  # destination ranks
    recvs: list[int]  # source ranks


@dataclass
class Program:
    """What one rank did, in order: ('issue', batch) and ('wait', batch)."""

    steps: list[tuple[str, Batch]] = field(default_factory=list)


class _RecordedBatch(P2PBatch):
    def __init__(self, batch: Batch, program: Program, stats: CommStats):
        super().__init__([], stats)
        self.batch, self.program = batch, program

    def wait(self, idle: bool) -> None:
        self.program.steps.append(("wait", self.batch))


class RecordingComm(GroupComm):
    """A communicator that records batches (receive buffers get zeros) and does no collective."""

    def __init__(self, name: str, ranks: list[int], rank: int, program: Program):
        super().__init__(None, ranks, CommStats())
        self.name, self.rank, self.program = name, rank, program

    def exchange(self, sends, recvs):
        for buf, _ in recvs:
            buf.zero_()
        batch = Batch(self.rank, self.name, [dst for _, dst in sends], [src for _, src in recvs])
        self.program.steps.append(("issue", batch))
        return _RecordedBatch(batch, self.program, self.stats)

    def wait_for_peers(self) -> None:  # collectives after the schedule are not point-to-point traffic
        pass

    def all_reduce(self, t, op=None):
        return t


def record(schedule: str, p: int, m: int, workload: str) -> list[Program]:
    """Run every stage of a p-stage pipeline (m microbatches) once and return each rank's program."""
    spec = RunSpec(strategy="pipeline", model="custom", n_layer=8, n_head=2, n_embd=8, vocab_size=16, block_size=16,
                   pp=p, microbatches=m, schedule=schedule, batch=2 * m, seq=4, workload=workload, new_tokens=3)  # fmt: skip
    idx = torch.randint(0, 16, (2 * m, 4), generator=torch.Generator().manual_seed(0))
    programs = []
    for stage in range(p):
        program = Program()
        mesh = Mesh(1, p, 1, stage, CommStats())
        mesh.world = RecordingComm("world", list(range(p)), stage, program)
        mesh.embed = RecordingComm("embed", [0, p - 1], stage, program) if stage in (0, p - 1) else None
        model = build_parallel_gpt(spec, mesh, torch.device("cpu"), torch.float32)
        if workload == "train":
            model.forward_backward(idx, idx)
        elif workload == "forward":
            model.forward_logits(idx)
        else:
            model.generate(idx, spec.new_tokens)
        programs.append(program)
    return programs


def separate_sends(programs: list[Program]) -> list[Program]:
    """The previous code: each send started on its own (in flight), then the receive waited for alone."""
    out = []
    for prog in programs:
        new, recv_only = Program(), {}
        for kind, b in prog.steps:
            if kind == "issue" and b.sends and b.recvs:
                recv_only[id(b)] = Batch(b.rank, b.comm, [], b.recvs)
                new.steps += [("issue", Batch(b.rank, b.comm, b.sends, [])), ("issue", recv_only[id(b)])]
            else:
                new.steps.append((kind, recv_only.get(id(b), b)))
        out.append(new)
    return out


def completes_without_buffering(programs: list[Program]) -> bool:
    """Replay the programs in the unbuffered model (module docstring); True when every batch finishes."""
    # The k-th message from a to b on a communicator meets the k-th receive b posts from a there.
    sent, received = defaultdict(int), defaultdict(int)
    ops: dict[int, list[list]] = {}  # id(batch) -> [[key, done], ...]
    for prog in programs:
        for kind, b in prog.steps:
            if kind != "issue":
                continue
            entries = []
            for dst in b.sends:
                key = ("msg", b.comm, b.rank, dst, sent[(b.comm, b.rank, dst)])
                sent[(b.comm, b.rank, dst)] += 1
                entries.append([key, "send", False])
            for src in b.recvs:
                key = ("msg", b.comm, src, b.rank, received[(b.comm, src, b.rank)])
                received[(b.comm, src, b.rank)] += 1
                entries.append([key, "recv", False])
            ops[id(b)] = entries
    streams: dict[tuple[int, str], deque] = defaultdict(deque)
    finished: set[int] = set()
    pcs = [0] * len(programs)
    progress = True
    while progress:
        progress = False
        for r, prog in enumerate(programs):  # ranks issue until they must wait for an unfinished batch
            while pcs[r] < len(prog.steps):
                kind, b = prog.steps[pcs[r]]
                if kind == "issue":
                    streams[(r, b.comm)].append(b)
                elif id(b) not in finished:
                    break
                pcs[r] += 1
                progress = True
        heads = {(r, c): q[0] for (r, c), q in streams.items() if q}
        posted = {}
        for b in heads.values():
            for entry in ops[id(b)]:
                if not entry[2]:
                    posted[(entry[0], entry[1])] = entry
        for (key, side), entry in posted.items():
            if side == "send" and (key, "recv") in posted:
                entry[2] = posted[(key, "recv")][2] = True
                progress = True
        for (r, c), b in heads.items():
            if all(e[2] for e in ops[id(b)]):
                streams[(r, c)].popleft()
                finished.add(id(b))
                progress = True
    return all(pc == len(p.steps) for pc, p in zip(pcs, programs, strict=True)) and not any(streams.values())


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
@pytest.mark.parametrize(("p", "m"), [(2, 1), (2, 4), (4, 1), (4, 3), (4, 8), (8, 2), (8, 16)])
def test_training_exchanges_complete_without_any_buffering(schedule, p, m):
    programs = record(schedule, p, m, "train")
    assert completes_without_buffering(programs)
    # Every activation and gradient crossed: 2 (p - 1) m messages in all.
    sends = sum(len(b.sends) for prog in programs for kind, b in prog.steps if kind == "issue")
    assert sends == 2 * (p - 1) * m


@pytest.mark.parametrize("workload", ["forward", "generate"])
@pytest.mark.parametrize(("p", "m"), [(2, 1), (2, 4), (4, 4), (8, 3)])
def test_assembly_line_exchanges_complete_without_any_buffering(workload, p, m):
    assert completes_without_buffering(record("gpipe", p, m, workload))


@pytest.mark.parametrize("m", [2, 4, 8])
def test_the_model_catches_send_then_receive_in_1f1b(m):
    """The check is not vacuous: sends started on their own before the receive deadlock in 1F1B's
    steady state, where neighbours send to each other (stage 0 activation i+1, stage 1 gradient i)."""
    programs = record("1f1b", 2, m, "train")
    assert completes_without_buffering(programs)
    assert not completes_without_buffering(separate_sends(programs))
