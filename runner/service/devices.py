"""Which GPUs this machine's runs may use: a pure function of NVML, torch's CUDA, the environment and processes.

A rank needs torch's CUDA, not NVML's list: NVML can list GPUs that torch cannot use (a CPU-only wheel, a
driver older than the wheel's CUDA runtime, a container with libnvidia-ml but no libcuda), and torch sees only
what the inherited CUDA_VISIBLE_DEVICES lets it see. So `resolve` takes, as plain data:

- `NvmlInventory`: NVML's GPUs (index in PCI bus order, UUID, name, memory, MIG mode and its instances, the
  pids of compute processes), the driver and the newest CUDA it supports, or why NVML cannot be read;
- `TorchView`: torch's CUDA as the runner's own Python sees it, probed in a subprocess
  (runner/service/device_probe.py): torch.version.cuda, is_available, each device's name and UUID
  (torch.cuda.get_device_properties(i).uuid), and the text of the error CUDA's initialisation raised;
- the inherited CUDA_VISIBLE_DEVICES (torch's probe already honoured it; here it names why a GPU is missing),
  the pids of the runner's own jobs, and whether a GPU may be shared with other users' processes;

and gives a `DeviceReport`: the GPUs runs may book (matched by UUID, so NVML's index and torch's ordinal never
need to agree), each excluded GPU with one sentence why, and one sentence where NVML and torch disagree. MIG is
refused: with MIG on, CUDA shows one instance per process instead of the GPU, so a second rank's cuda:1 does
not exist; a GPU in MIG mode, or a MIG instance torch was given, is excluded and says how to get a whole GPU.
A GPU with compute processes the runner did not start is busy: shown, counted for validation (it may free up),
never booked unless sharing is allowed (LAB_SHARE_GPUS=1 or `serve --share-gpus`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

SHARE_ENV = "LAB_SHARE_GPUS"  # "1": book GPUs that other users' processes use too
NOTE_CHARS = 300  # what a runner lease stores of the note (storage.models.RunnerLease.gpu_note)
_MIG_NAME = re.compile(r"\bMIG\b")


def uuid_key(uuid: str) -> str:
    """A UUID as both NVML ("GPU-8f3c..." / "MIG-...") and torch ("8f3c...") write it, compared bare."""
    u = uuid.strip().lower()
    for prefix in ("gpu-", "mig-"):
        if u.startswith(prefix):
            u = u[len(prefix) :]
    return u


def is_mig_name(name: str) -> bool:
    """A MIG instance's name, as CUDA and NVML report it ('NVIDIA A100-SXM4-80GB MIG 1g.10gb')."""
    return bool(_MIG_NAME.search(name))


@dataclass(frozen=True)
class NvmlGpu:
    index: int  # NVML's, in PCI bus order
    uuid: str  # "GPU-..."
    name: str
    memory_total: int
    mig: bool = False  # MIG mode is on (current mode)
    mig_uuids: tuple[str, ...] = ()  # its MIG instances ("MIG-...")
    pids: tuple[int, ...] = ()  # compute processes on it


@dataclass(frozen=True)
class NvmlInventory:
    gpus: tuple[NvmlGpu, ...] = ()
    driver: str | None = None  # "550.54.15"
    cuda_driver: str | None = None  # the newest CUDA the driver supports, "12.4"
    error: str | None = None  # why NVML cannot be read (not installed, no driver library, an NVML error)


@dataclass(frozen=True)
class TorchGpu:
    index: int  # torch's ordinal under the inherited CUDA_VISIBLE_DEVICES
    name: str
    uuid: str  # as torch prints it: bare for a whole GPU and for a MIG instance alike
    memory_total: int = 0


@dataclass(frozen=True)
class TorchView:
    version: str | None  # torch.__version__; None when torch could not be probed at all
    cuda: str | None = None  # torch.version.cuda; None for a CPU-only build
    available: bool = False  # torch.cuda.is_available()
    gpus: tuple[TorchGpu, ...] = ()
    error: str | None = None  # what CUDA's initialisation (or the probe) raised
    nccl: str | None = None  # NCCL's version in this build, when CUDA is usable


@dataclass(frozen=True)
class Gpu:
    """A GPU runs may book: NVML's index (what runs.gpus records), its UUID (what a job's CUDA_VISIBLE_DEVICES
    gets), and the pids of other users' compute processes on it (busy when any)."""

    index: int
    uuid: str
    name: str
    memory_total: int
    busy_pids: tuple[int, ...] = ()

    @property
    def busy(self) -> bool:
        return bool(self.busy_pids)

    def to_dict(self) -> dict:
        """The lease's entry (storage.hosts), also what the planner reads a GPU from."""
        return {"index": self.index, "uuid": self.uuid, "name": self.name, "memory_total": self.memory_total,
                "busy_pids": list(self.busy_pids)}  # fmt: skip


@dataclass(frozen=True)
class Excluded:
    index: int | None  # NVML's index; None for a device only torch lists
    name: str
    why: str


@dataclass(frozen=True)
class DeviceReport:
    """What `resolve` decided. `problem`: the one sentence why torch cannot use NVML's GPUs (or why there is no
    GPU at all), None when torch can; `caveat`: a sentence about what could not be checked."""

    gpus: tuple[Gpu, ...] = ()
    excluded: tuple[Excluded, ...] = ()
    problem: str | None = None
    caveat: str | None = None
    shared: bool = False
    nvml: NvmlInventory = field(default_factory=NvmlInventory)
    torch: TorchView = field(default_factory=lambda: TorchView(None))

    def free(self, booked: Iterable[int]) -> list[Gpu]:
        """The GPUs a new run may take now: not booked by a run of this runner, not busy unless shared."""
        taken = set(booked)
        return [g for g in self.gpus if g.index not in taken and (self.shared or not g.busy)]

    def busy_text(self, booked: Iterable[int] = ()) -> str:
        """'GPU 3 busy (pids 4211, 4388 not started by this runner)' for each busy GPU not booked; '' if none."""
        taken = set(booked)
        return "; ".join(f"GPU {g.index} busy (pid{'s' if len(g.busy_pids) > 1 else ''} "
                         f"{', '.join(map(str, g.busy_pids))} not started by this runner)"
                         for g in self.gpus if g.busy and g.index not in taken)  # fmt: skip

    def no_gpu_reason(self) -> str:
        """Why a cuda run cannot run here, one sentence (validation's message)."""
        if self.problem:
            return self.problem
        if self.excluded:
            return "every GPU is excluded: " + excluded_text(self.excluded)
        return "no NVIDIA GPU is visible"

    def note(self) -> str:
        """The runner's account in a few sentences (the lease's gpu_note, the dashboard, `serve`'s first line)."""
        if not self.gpus:  # exactly no_gpu_reason(): what submit says for a host whose lease shows no GPU
            return _cut(self.no_gpu_reason())
        parts = [f"{len(self.gpus)} GPU{'s' if len(self.gpus) != 1 else ''} usable by torch {self.torch.version} "
                 f"(CUDA {self.torch.cuda})"]  # fmt: skip
        if self.excluded:
            parts.append("Excluded: " + excluded_text(self.excluded))
        if self.caveat:
            parts.append(self.caveat)
        if self.shared:
            parts.append(f"GPUs other processes use are booked too ({SHARE_ENV}=1)")
        return _cut(". ".join(p.rstrip(".") for p in parts) + ".")

    def lease_gpus(self) -> list[dict]:
        return [g.to_dict() for g in self.gpus]


def _cut(text: str) -> str:
    return text if len(text) <= NOTE_CHARS else text[: NOTE_CHARS - 1] + "…"


def excluded_text(excluded: Iterable[Excluded]) -> str:
    """'GPUs 6, 7 (not in CUDA_VISIBLE_DEVICES=...)': the excluded GPUs grouped by their reason, in order."""
    groups: dict[str, list[str]] = {}
    for e in excluded:
        names = groups.setdefault(e.why, [])
        name = str(e.index) if e.index is not None else e.name
        if name not in names:  # several MIG instances of one GPU name it once
            names.append(name)
    clauses = []
    for why, names in groups.items():
        numbered = all(n.isdigit() for n in names)
        label = (f"GPU{'s' if len(names) > 1 else ''} " if numbered else "") + ", ".join(names)
        clauses.append(f"{label} ({why})")
    return "; ".join(clauses)


MIG_WHY = ("in MIG mode: CUDA shows one MIG instance per process, so a run of more than one rank cannot use it; "
           "this lab runs one rank per whole GPU: disable MIG (`nvidia-smi -i <GPU> -mig 0` as root, then reset "
           "the GPU) or use GPUs without it")  # fmt: skip


def torch_problem(torch: TorchView, nvml: NvmlInventory, visible: str | None) -> str:
    """One sentence: why torch's CUDA cannot be used, against what NVML lists (CPU-only build, a driver too old
    for this CUDA runtime, no driver library, every GPU hidden by CUDA_VISIBLE_DEVICES, anything else)."""
    n = len(nvml.gpus)
    listed = f"the {n} GPU{'s' if n != 1 else ''} NVML lists" if n else "any GPU"
    error = (torch.error or "").strip()
    if torch.version is None:
        return f"torch could not be probed in the runner's Python ({error or 'no answer'})"
    if torch.cuda is None:
        return (f"torch {torch.version} is a CPU-only build (torch.version.cuda is None), so it cannot use {listed}"
                + ("; install a CUDA build of torch" if n else ""))  # fmt: skip
    low = error.lower()
    if "too old" in low:
        supports = f" (it supports CUDA {nvml.cuda_driver} at most)" if nvml.cuda_driver else ""
        driver = f"NVIDIA driver {nvml.driver}" if nvml.driver else "NVIDIA driver"
        return (f"the {driver}{supports} is too old for the CUDA {torch.cuda} runtime of torch {torch.version}: "
                f"update the driver, or install a torch built for the CUDA it supports")  # fmt: skip
    if "no nvidia driver" in low or "found no nvidia" in low:
        return (f"torch {torch.version} (CUDA {torch.cuda}) finds no NVIDIA driver (libcuda) although NVML lists "
                f"{n} GPU{'s' if n != 1 else ''}: a container started without the driver's CUDA library, or a broken "
                "driver install")  # fmt: skip
    if visible is not None and (not visible.strip() or "no cuda gpus are available" in low or not error):
        return f"CUDA_VISIBLE_DEVICES={visible!r}, inherited by the runner, hides every GPU from torch"
    if not error:
        return f"torch {torch.version} (CUDA {torch.cuda}) sees no CUDA device"
    return f"torch {torch.version} (CUDA {torch.cuda}) cannot initialise CUDA: {error.splitlines()[0][:160]}"


def resolve(nvml: NvmlInventory, torch: TorchView, visible: str | None, own_pids: Iterable[int] = (),
            shared: bool = False) -> DeviceReport:  # fmt: skip
    """The GPUs runs may use here, and why each other one is not (see the module docstring).

    visible: the inherited CUDA_VISIBLE_DEVICES (None when unset); own_pids: the runner's own job processes,
    whose GPU use never makes a GPU busy; shared: book busy GPUs too.
    """
    own = set(own_pids)
    if torch.available and torch.gpus and not torch.nccl:
        return DeviceReport(problem=f"torch {torch.version} has CUDA {torch.cuda} but no NCCL "
                                    "(torch.distributed.is_nccl_available() is False), so ranks on GPUs cannot talk; "
                                    "install an official CUDA build of torch", shared=shared, nvml=nvml, torch=torch)  # fmt: skip
    if not (torch.available and torch.gpus):
        if not nvml.gpus and torch.version is not None and torch.cuda is None:
            why = f"NVML {_nvml_state(nvml)} and torch {torch.version} is a CPU-only build"
            return DeviceReport(problem=f"no NVIDIA GPU: {why}", shared=shared, nvml=nvml, torch=torch)
        return DeviceReport(problem=torch_problem(torch, nvml, visible), shared=shared, nvml=nvml, torch=torch)
    by_uuid = {uuid_key(g.uuid): g for g in nvml.gpus}
    by_mig = {uuid_key(m): g for g in nvml.gpus for m in g.mig_uuids}
    usable: dict[int, Gpu] = {}
    excluded: list[Excluded] = []
    seen: set[int] = set()
    caveat = None
    for t in torch.gpus:
        key = uuid_key(t.uuid)
        if key in by_mig or is_mig_name(t.name):
            parent = by_mig.get(key)
            if parent is not None:
                seen.add(parent.index)
            excluded.append(Excluded(parent.index if parent else None, t.name, MIG_WHY))
        elif key in by_uuid:
            g = by_uuid[key]
            seen.add(g.index)
            if g.mig:
                excluded.append(Excluded(g.index, g.name, MIG_WHY))
            else:
                busy = tuple(sorted(p for p in g.pids if p not in own))
                usable[g.index] = Gpu(g.index, g.uuid, g.name, g.memory_total, busy)
        elif nvml.error:
            # No NVML to match against: torch's view stands (by its ordinal), unchecked for busy and MIG.
            usable[t.index] = Gpu(t.index, f"GPU-{key}", t.name, t.memory_total)
            caveat = (f"NVML cannot be read ({nvml.error}): GPUs are taken as torch sees them, unchecked for other "
                      "users' processes, and without GPU telemetry")  # fmt: skip
        else:
            excluded.append(Excluded(None, t.name, f"torch's cuda:{t.index} (UUID {t.uuid}) is not among NVML's GPUs"))
    for g in nvml.gpus:
        if g.index in seen:
            continue
        if g.mig:
            why = MIG_WHY
        elif visible is not None:
            why = f"not in CUDA_VISIBLE_DEVICES={visible!r}, inherited by the runner"
        else:
            why = "NVML lists it but torch does not see it"
        excluded.append(Excluded(g.index, g.name, why))
    gpus = tuple(usable[i] for i in sorted(usable))
    problem = None if gpus else "every GPU is excluded: " + excluded_text(excluded)
    return DeviceReport(gpus, tuple(excluded), problem, caveat, shared, nvml, torch)


def _nvml_state(nvml: NvmlInventory) -> str:
    return f"is unavailable ({nvml.error})" if nvml.error else "lists no GPU"
