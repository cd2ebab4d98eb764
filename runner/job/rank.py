"""The torchrun entry point, one process per rank: build the shard -> verify -> warm up -> timed steps -> result.

`python -m runner.job RUN_DIR/spec.json` under torchrun. Each rank writes its output to
`rank<R>.log`, progress and timelines to `events.jsonl` (runner.spec.records events); rank 0 gathers every
rank's RankFigures and writes `result.json` (a runner.spec.records.Result; formats in docs/run-folder.md).
The strategy's model comes from the registry (runner.spec.strategies.build). The job never touches the database.
"""

from __future__ import annotations

import json
import os
import platform
import socket
import statistics
import sys
import time
import traceback
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from runner.gpt.config import kv_copies
from runner.gpt.mesh import Mesh, barrier
from runner.gpt.precision import optimizer_state_bytes, precision_of
from runner.gpt.strategy import ParallelGPT
from runner.job import corpus, losses
from runner.job.checkpoint import HFFolder, open_weights, shard_reader
from runner.job.data import Batches, fold_seed
from runner.job.load import LoadMeter, machine_load
from runner.job.metrics import device_peak_flops, model_flops_per_step, percentile, step_number, tokens_per_step
from runner.job.resources import CpuWaitMeter, MemoryMeter, pin_rank, rank_cores
from runner.job.verify import inject_fault, trim_padding, verify_pass
from runner.service import node_telemetry
from runner.service.devices import MIG_WHY, is_mig_name
from runner.spec import strategies
from runner.spec.records import Error, Event, Finished, RankFigures, Result, Span, Started, Step
from runner.spec.run_spec import RunSpec, usable_cores


class EventLog:
    """Appends one JSON line per event with a single write on an O_APPEND descriptor (ranks share the file)."""

    def __init__(self, path: Path, rank: int):
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self.rank = rank

    def emit(self, event: Event) -> None:
        os.write(self.fd, event.to_json_line().encode())


def redirect_output(run_dir: Path, rank: int) -> None:
    """Send this rank's stdout/stderr (Python and C++ alike) to rank<R>.log."""
    fd = os.open(run_dir / f"rank{rank}.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    sys.stdout = os.fdopen(1, "w", buffering=1)
    sys.stderr = os.fdopen(2, "w", buffering=1)


def choose_device(spec: RunSpec, local_rank: int) -> tuple[torch.device, str]:
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if spec.resolved_device(gpus) == "cuda":
        name = torch.cuda.get_device_name(local_rank)
        if is_mig_name(name):  # a Slurm node's MIG GRES: the runner refuses MIG before a job starts on its machine
            raise RuntimeError(f"cuda:{local_rank} is a MIG instance ({name}), {MIG_WHY}")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank), "nccl"
    return torch.device("cpu"), "gloo"


def gpu_uuids(device: torch.device) -> list[str]:
    """This node's GPUs of the job in CUDA order, as torch prints their UUIDs (bare: a whole GPU's and a MIG
    instance's look alike; the node sampler tells them apart through NVML); [] on CPU."""
    if device.type != "cuda":
        return []
    return [str(torch.cuda.get_device_properties(i).uuid) for i in range(torch.cuda.device_count())]


def run_job(spec: RunSpec, run_dir: Path) -> None:
    rank = int(os.environ["RANK"])
    world = int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    events = EventLog(run_dir / "events.jsonl", rank)
    device, backend = choose_device(spec, local_rank)
    # Pin before the process group exists, so gloo's threads inherit the rank's core.
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    cores = usable_cores()  # before pinning narrows this process to one
    # The cores the job's ranks run on here: those they are pinned to, else (oversubscribed, or a GPU job) all
    # of the affinity, read before pinning narrows it.
    load = LoadMeter.on(rank_cores(local_world) if device.type == "cpu" else None, local_rank)
    core = pin_rank(local_rank, local_world) if device.type == "cpu" else None
    # A dead peer must not hang the others forever: collectives give up after this long.
    timeout = timedelta(seconds=max(30.0, min(spec.time_limit_s, 600.0)))
    host = os.environ.get("SLURMD_NODENAME") or socket.gethostname()  # the node, as Slurm names it
    # A multi-node job is sampled on each node by a process the node's first rank starts (runner/service/node_telemetry.py).
    node_sampler = None
    if os.environ.get(node_telemetry.ENV) and local_rank == 0:
        node_sampler = node_telemetry.start_node_sampler(run_dir, host, os.getppid(), gpu_uuids(device))
    # Before the process group: the first rank to open a text corpus tokenizes it into its cache while the
    # others wait on its lock (runner/job/corpus.py); a long tokenization must not eat the collectives' timeout.
    batches = Batches.of(spec)
    # On CUDA the default group is bound to this rank's GPU: NCCL's communicators are then created here and in
    # Mesh.build (eagerly, ncclCommSplit), not lazily at the first collective of a timed step.
    dist.init_process_group(backend, timeout=timeout, device_id=device if device.type == "cuda" else None)
    events.emit(Started(rank, time.time(), world_size=world, device=device.type, backend=backend, pid=os.getpid(),
                        host=host))  # fmt: skip
    memory = MemoryMeter.after_setup(device)
    cpu_wait = CpuWaitMeter()
    dtype = precision_of(spec.dtype).param_dtype
    mesh = Mesh.build(spec.degrees, tied=spec.workload != "forward", kv_share=kv_copies(spec.model_config(), spec.degrees.tp))
    torch.manual_seed(fold_seed(spec.seed))
    model = strategies.build(spec, mesh, device, dtype)
    weights, weights_read = None, {}
    if spec.weights:
        weights = open_weights(spec.weights, spec.model_config())
        load_shards(model, weights)
        if isinstance(weights, HFFolder):  # what this rank read of the folder: its own slices, not the model
            weights_read = {"weights_bytes_read": weights.bytes_read}
    inject_fault(model)

    verify = None
    if spec.verify:
        idx, targets = batches.train(-1)
        verify = verify_pass(spec, model, weights, idx, targets)

    optimizer = model.make_optimizer(spec.lr) if spec.workload == "train" else None
    total = spec.warmup + spec.steps
    step_times: list[float] = []
    step_losses: list[float | None] = []
    step_wall_total = 0.0
    held_out = batches.held_out() if spec.eval_every else []
    generated: torch.Tensor | None = None
    for step in range(total):
        timed = step >= spec.warmup
        if step == spec.warmup:  # the run's own memory and CPU wait are those of the timed steps
            memory.start_timed()
            cpu_wait.start_timed()
            load.start()
        mesh.stats.counting = timed
        idx, targets = batches.prompt(spec.prompt) if spec.prompt is not None else batches.train(step)
        idx, targets = idx.to(device), targets.to(device)
        barrier()
        # Every figure of the step comes from one clock (runner/gpt/timing.py): host time on CPU, CUDA
        # events on GPU, turned into seconds once the step is over; nothing inside it drains the device.
        clock = mesh.clock
        clock.start_step()
        model.begin_step(step, time.perf_counter())
        loss, out = run_step(spec, model, optimizer, idx, targets)
        work_end = clock.mark()
        barrier()  # the step ends when the slowest rank ends; waiting for it is idle time
        end_mark = clock.mark()
        mesh.stats.time(work_end, end_mark, idle=True)
        seconds = clock.end_step(end_mark)  # the step's one synchronize on CUDA
        if timed:
            step_times.append(seconds)
            step_wall_total += seconds
        step_losses.append(loss)
        generated = out if out is not None else generated
        # What rank 0 reports: the global batch's loss, and the held-out loss on eval_every's steps (untimed).
        reported = losses.global_loss(model, spec.workload, loss, spec.batch) if spec.workload != "generate" else None
        evaluated = None
        if spec.eval_every and ((step + 1) % spec.eval_every == 0 or step == total - 1):
            evaluated = losses.held_out_loss(model, held_out)
        for span in model.take_spans():
            if timed:
                events.emit(Span(rank, time.time(), step=step, **span))
        # One line a step in every rank's log: what the Live page's log tail and `runner logs --follow` show.
        phase = "warm-up" if not timed else "timed"
        print(
            f"step {step_number(step)}/{total} ({phase}) {seconds * 1e3:.1f} ms"
            + (f" loss {loss:.4f}" if loss is not None else "")
            + (f" held-out loss {evaluated:.4f}" if evaluated is not None else ""),
            flush=True,
        )
        if rank == 0:
            events.emit(Step(rank, time.time(), step=step, total_steps=total, warmup=not timed, step_time_s=seconds,
                             loss=reported, eval_loss=evaluated))  # fmt: skip

    mesh.stats.counting = False
    machine = load.figures()  # right at the timed steps' end, before anything else runs
    optimizer_bytes = optimizer_state_bytes(optimizer) if optimizer is not None else 0
    params = model.parameters()
    comm = mesh.stats.as_dict()
    c = mesh.coord
    # One flat dict, as every version wrote it; keys RankFigures does not declare (the strategy's own
    # figures, ParallelGPT.figures()) land in its `strategy`.
    mine = RankFigures.from_dict({
        "rank": rank,
        "tp": c.tp,
        "pp": c.pp,
        "dp": c.dp,
        "param_count": sum(p.numel() for p in params),
        "param_bytes": sum(p.numel() * p.element_size() for p in params),
        "optimizer_bytes": optimizer_bytes,
        **memory.figures(),
        "cpu_wait_s": cpu_wait.seconds() if device.type == "cpu" else None,
        "cpu_core": core,
        "cpu_oversubscribed": device.type == "cpu" and local_world > cores,
        "cpu_cores": cores if device.type == "cpu" else None,
        "compute_s": max(0.0, step_wall_total - comm["comm_s"] - comm["idle_s"]),
        **comm,
        "loss": step_losses[-1] if step_losses else None,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "host": host,
        **machine,
        **model.figures(),
        **weights_read,
    })  # fmt: skip

    def untimed_step() -> None:
        idx, targets = batches.prompt(spec.prompt) if spec.prompt is not None else batches.train(total)
        idx, targets = idx.to(device), targets.to(device)
        barrier()
        mesh.clock.start_step()
        model.begin_step(total, time.perf_counter())
        run_step(spec, model, optimizer, idx, targets)
        mesh.clock.end_step(mesh.clock.mark())
        model.take_spans()

    # After every timed figure is read: on CPU this runs steps of its own (not timed, counted or logged).
    mine.peak_tensor_bytes = memory.tensor_peak(untimed_step)
    mine.cublas_workspace_bytes = memory.workspace_bytes
    if "bubble_fraction_theory" in mine.strategy and step_wall_total > 0:  # only where a pipeline trains
        # The bubble as measured: the share of the step this stage stood idle -- blocked on a receive
        # from a neighbour, on the tied embedding's peer, or at the barrier ending the step.
        mine.bubble_fraction = comm["idle_s"] / step_wall_total
    gathered: list[RankFigures | None] = [None for _ in range(world)]
    dist.all_gather_object(gathered, mine)
    text = generated_text(spec, batches, model, generated)
    if rank == 0:
        write_result(spec, run_dir, world, device, backend, step_times, [g for g in gathered if g], verify, text)
    events.emit(Finished(rank, time.time()))
    barrier()
    node_telemetry.stop_node_sampler(node_sampler)  # on a crash it dies with this process (PR_SET_PDEATHSIG)
    dist.destroy_process_group()


def run_step(spec: RunSpec, model: ParallelGPT, optimizer, idx: torch.Tensor,
             targets: torch.Tensor) -> tuple[float | None, torch.Tensor | None]:  # fmt: skip
    """One step of the workload: (this rank's loss or None, generated tokens on generate's output ranks)."""
    if spec.workload == "forward":
        return losses.forward_loss(model, idx, targets), None
    if spec.workload == "generate":
        return None, model.generate(idx, spec.new_tokens)
    optimizer.zero_grad(set_to_none=True)
    loss = model.forward_backward(idx, targets)
    model.optimizer_step(optimizer)
    return loss, None


def generated_text(spec: RunSpec, batches: Batches, model: ParallelGPT, out: torch.Tensor | None) -> dict:
    """A generate run on text: its first row's prompt, continuation ids and their text (for result.json),
    read from the output rank holding that row (tp 0, dp 0); {} for other runs. Every rank calls it."""
    if spec.workload != "generate" or not batches.source.decodable:
        return {}
    c = model.mesh.coord
    row = out[0].tolist() if out is not None and c.tp == 0 and c.dp == 0 else None
    rows: list[list[int] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(rows, row)
    ids = next((r for r in rows if r is not None), None)
    if ids is None:
        return {}
    prompt, continuation = ids[: spec.seq], ids[spec.seq :]
    return {"prompt": corpus.decode(batches.source, prompt), "generated_ids": continuation,
            "generated_text": corpus.decode(batches.source, continuation)}  # fmt: skip


def load_shards(model: ParallelGPT, weights) -> None:
    """Copy each local shard from the run's weights: a Hugging Face Llama-family folder is read slice by slice
    (this rank's rows and columns only), a GPT-2 file was read whole."""
    read = shard_reader(weights)
    with torch.no_grad():
        for name, p in model.named_shards().items():
            src = read(name, model.shard_index(name))
            trim_padding(p, src.shape).copy_(src.to(p.dtype))


def write_result(spec, run_dir, world, device, backend, step_times, ranks: list[RankFigures], verify,
                 text: dict) -> None:  # fmt: skip
    rank_losses = [r.loss for r in ranks if r.loss is not None]
    p50 = percentile(step_times, 0.5) if step_times else None
    flops = model_flops_per_step(spec)
    achieved = flops / p50 if p50 else None
    names = sorted({r.device_name for r in ranks if r.device_name})
    # One peak for the run: only when every rank is the same known device (else no MFU rather than a wrong one).
    peak = device_peak_flops(names[0], spec.dtype) if device.type == "cuda" and len(names) == 1 else None
    on_cpu = device.type == "cpu"
    stage_bubbles = [r.bubble_fraction for r in ranks if r.bubble_fraction is not None]
    result = Result(
        run_id=json.loads((run_dir / "spec.json").read_text()).get("run_id"),
        world_size=world,
        device=device.type,
        backend=backend,
        device_names=names,
        torch_version=torch.__version__,
        hostname=socket.gethostname(),
        step_time_s_p50=p50,
        step_time_s_p90=percentile(step_times, 0.9) if step_times else None,
        step_time_s_mean=statistics.fmean(step_times) if step_times else None,
        step_times_s=step_times,
        tokens_per_s=tokens_per_step(spec) / p50 if p50 else None,
        flops_per_step=flops,
        achieved_gflops=achieved / 1e9 if achieved else None,
        peak_flops=peak,
        mfu=achieved / (peak * world) if achieved and peak else None,
        loss=rank_losses[-1] if rank_losses else None,
        bubble_fraction=statistics.fmean(stage_bubbles) if stage_bubbles else None,
        bubble_fraction_theory=ranks[0].strategy.get("bubble_fraction_theory"),
        verify=verify,
        cpu_oversubscribed=any(r.cpu_oversubscribed for r in ranks),
        cpu_cores=ranks[0].cpu_cores,
        cpu_pinned=on_cpu and all(r.cpu_core is not None for r in ranks),
        **machine_load(ranks),
        **text,
        ranks=ranks,
    )
    tmp = run_dir / "result.json.tmp"
    tmp.write_text(result.to_json())
    tmp.replace(run_dir / "result.json")


def main(argv: list[str] | None = None) -> int:
    # torchrun gives each rank a session of its own: without this a rank outlives a killed torchrun.
    from runner.service.launch import die_with_launcher

    die_with_launcher()
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: torchrun ... -m runner.job RUN_DIR/spec.json", file=sys.stderr)
        return 2
    spec_path = Path(argv[0]).resolve()
    run_dir = spec_path.parent
    rank = int(os.environ.get("RANK", "0"))
    redirect_output(run_dir, rank)
    data = json.loads(spec_path.read_text())
    spec = RunSpec.from_dict({k: v for k, v in data.items() if k not in ("run_id", "run_dir")})
    try:
        run_job(spec, run_dir)
    except BaseException as exc:
        tb = traceback.format_exc()
        print(tb, file=sys.stderr, flush=True)
        if not isinstance(exc, KeyboardInterrupt):
            error = Error(rank, time.time(), error=f"{type(exc).__name__}: {exc}", traceback=tb)
            EventLog(run_dir / "events.jsonl", rank).emit(error)
        return 1
    return 0


def exit_without_finalising(code: int) -> None:
    """Leave without interpreter finalisation: gloo's C++ worker threads can still hold work objects
    then, and tearing them down at that point aborts the process (SIGABRT, "terminate called without
    an active exception") after a run that had finished and written its result."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
