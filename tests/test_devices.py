"""Device truth on described machines: which GPUs runs may use, and the sentence for each one they may not.

Every case is the pure function (runner/service/devices.py) fed what NVML, torch's CUDA and the environment
would say on that machine; NVML itself is the described machine behind pynvml's interface (tests/fake_nvml.py).
The last tests are this machine as it is: CPU-only torch, no NVML, so `submit --device cuda` is refused.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from runner.job.metrics import device_peak_flops
from runner.service.device_probe import probe_torch, read_inventory, torch_build
from runner.service.devices import NvmlGpu, NvmlInventory, TorchGpu, TorchView, resolve
from runner.service.gpu_pool import GpuPool
from runner.service.launch import job_env
from runner.service.nvml import Nvml
from runner.spec.run_spec import RunSpec
from runner.spec.validation import validate_spec
from tests.fake_nvml import LIB_RM_VERSION_MISMATCH, FakeGpu, FakeNvml

REPO = Path(__file__).resolve().parents[1]
H100 = "NVIDIA H100 80GB HBM3"
TORCH = dict(version="2.6.0+cu124", cuda="12.4", available=True, nccl="2.21.5")


def uuid(i: int) -> str:
    return f"{i:08x}-1111-2222-3333-444455556666"


def machine(n: int = 8, **per_gpu) -> NvmlInventory:
    """n H100s; per_gpu: {index: dict of NvmlGpu fields to change}."""
    gpus = [NvmlGpu(i, f"GPU-{uuid(i)}", H100, 80 * 2**30, **per_gpu.get(str(i), {})) for i in range(n)]
    return NvmlInventory(tuple(gpus), "550.54.15", "12.4")


def torch_sees(*indices: int, **kw) -> TorchView:
    """torch's view when CUDA shows these NVML GPUs, as ordinals 0, 1, ... in that order."""
    return TorchView(**{**TORCH, **kw}, gpus=tuple(TorchGpu(o, H100, uuid(i)) for o, i in enumerate(indices)))


def test_eight_gpus_with_two_hidden_by_an_inherited_cuda_visible_devices_of_indices_or_uuids():
    by_index = resolve(machine(), torch_sees(0, 1, 2, 3, 4, 5), "0,1,2,3,4,5")
    by_uuid = resolve(machine(), torch_sees(0, 1, 2, 3, 4, 5), ",".join(f"GPU-{uuid(i)}" for i in range(6)))
    for report in (by_index, by_uuid):
        assert [g.index for g in report.gpus] == [0, 1, 2, 3, 4, 5] and report.problem is None
        assert [e.index for e in report.excluded] == [6, 7]
        assert "GPUs 6, 7 (not in CUDA_VISIBLE_DEVICES=" in report.note() and report.note().startswith("6 GPUs usable")
    assert validate_spec(RunSpec(strategy="data", dp=8, device="cuda"), gpu_count=len(by_index.gpus))[0].message == (
        "8 ranks need 8 GPUs but 6 are visible; lower the degrees or choose 'cpu'")


def test_an_inherited_cuda_visible_devices_renumbers_but_jobs_get_the_same_gpus_by_uuid():
    # CUDA_VISIBLE_DEVICES=4,5: torch's cuda:0 is NVML's GPU 4. Runs book NVML indices and start on UUIDs, so a
    # job never lands on GPUs 0 and 1, which the operator excluded (the index 4 would mean nothing to its CUDA).
    report = resolve(machine(), torch_sees(4, 5), "4,5")
    pool = GpuPool(shared=False, report=report, inventory=lambda: machine())
    assert pool.free([]) == [4, 5]
    env = job_env(RunSpec(strategy="data", dp=2, device="cuda"), pool.uuids([4, 5]))
    assert env["CUDA_VISIBLE_DEVICES"] == f"GPU-{uuid(4)},GPU-{uuid(5)}"


def test_a_gpu_another_users_process_holds_is_busy_and_not_booked_unless_sharing_is_allowed():
    inventory = machine(4, **{"2": {"pids": (4242,)}, "3": {"pids": (777,)}})
    report = resolve(inventory, torch_sees(0, 1, 2, 3), None, own_pids={777})  # 777: one of our own ranks
    assert [g.index for g in report.gpus] == [0, 1, 2, 3]  # counted: a busy GPU may free up
    assert [g.index for g in report.free(booked=[0])] == [1, 3]
    assert report.busy_text([0]) == "GPU 2 busy (pid 4242 not started by this runner)"
    shared = resolve(inventory, torch_sees(0, 1, 2, 3), None, own_pids={777}, shared=True)
    assert [g.index for g in shared.free(booked=[0])] == [1, 2, 3] and "LAB_SHARE_GPUS=1" in shared.note()
    pool = GpuPool(shared=False, report=report, inventory=lambda: inventory)
    assert pool.wait_reason(4, [0]) == ("waiting for 4 free GPUs (2 free now; GPU 2 busy (pid 4242 not started by "
                                        "this runner))")


def test_mig_is_refused_and_a_mig_slice_never_takes_the_whole_gpus_peak():
    mig = f"MIG-{uuid(100)}"
    inventory = machine(2, **{"0": {"mig": True, "mig_uuids": (mig,)}})
    # With MIG on, CUDA enumerates GPU 0's instance instead of GPU 0.
    torch = TorchView(**TORCH, gpus=(TorchGpu(0, f"{H100} MIG 3g.40gb", uuid(100)), TorchGpu(1, H100, uuid(1))))
    report = resolve(inventory, torch, None)
    assert [g.index for g in report.gpus] == [1]
    assert report.excluded[0].index == 0 and "in MIG mode" in report.excluded[0].why
    assert "-mig 0" in report.excluded[0].why  # and how to get the whole GPU back
    only_mig = resolve(inventory, TorchView(**TORCH, gpus=(torch.gpus[0],)), mig)  # CUDA_VISIBLE_DEVICES=MIG-...
    assert only_mig.gpus == () and only_mig.problem.startswith("every GPU is excluded: GPU 0 (in MIG mode")
    assert only_mig.problem.endswith(f"GPU 1 (not in CUDA_VISIBLE_DEVICES='{mig}', inherited by the runner)")
    assert device_peak_flops(H100, "bfloat16") == 989e12
    assert device_peak_flops(f"{H100} MIG 1g.10gb", "bfloat16") is None


def test_a_cpu_only_torch_on_a_machine_with_gpus_says_so_and_cuda_is_refused_with_it():
    torch = TorchView("2.6.0+cpu", None, False, error="Torch not compiled with CUDA enabled")
    report = resolve(machine(), torch, None)
    assert report.gpus == ()
    assert report.problem == ("torch 2.6.0+cpu is a CPU-only build (torch.version.cuda is None), so it cannot use "
                              "the 8 GPUs NVML lists; install a CUDA build of torch")
    problems = validate_spec(RunSpec(strategy="single", device="cuda"), gpu_count=0,
                             no_gpu_reason=report.no_gpu_reason())  # fmt: skip
    assert [(p.field, p.message) for p in problems] == [("device", f"is 'cuda' but {report.problem}; choose 'cpu' or "
                                                                   "'auto'")]  # fmt: skip


def test_a_driver_too_old_for_the_wheels_cuda_runtime_names_both_versions():
    nvml = NvmlInventory(machine().gpus, "470.82.01", "11.4")
    error = ("The NVIDIA driver on your system is too old (found version 11040). Please update your GPU driver by "
             "downloading and installing a new version from the URL: http://www.nvidia.com/Download/index.aspx")
    report = resolve(nvml, TorchView("2.6.0+cu124", "12.4", False, error=error), None)
    assert report.problem == ("the NVIDIA driver 470.82.01 (it supports CUDA 11.4 at most) is too old for the CUDA "
                              "12.4 runtime of torch 2.6.0+cu124: update the driver, or install a torch built for the "
                              "CUDA it supports")


def test_no_driver_for_torch_and_every_gpu_hidden_are_told_apart():
    no_libcuda = TorchView("2.6.0+cu124", "12.4", False, error="Found no NVIDIA driver on your system. Please check "
                           "that you have an NVIDIA GPU and installed a driver")  # fmt: skip
    assert "finds no NVIDIA driver (libcuda) although NVML lists 8 GPUs" in resolve(machine(), no_libcuda, None).problem
    hidden = TorchView("2.6.0+cu124", "12.4", False, error="No CUDA GPUs are available")
    assert resolve(machine(), hidden, "").problem == ("CUDA_VISIBLE_DEVICES='', inherited by the runner, hides every "
                                                      "GPU from torch")
    no_nccl = resolve(machine(1), torch_sees(0, nccl=None), None)
    assert no_nccl.gpus == () and "no NCCL" in no_nccl.problem


def test_without_nvml_torch_s_gpus_stand_with_the_caveat_said():
    report = resolve(NvmlInventory(error="nvidia-ml-py is not installed"), torch_sees(0, 1), None)
    assert [g.uuid for g in report.gpus] == [f"GPU-{uuid(0)}", f"GPU-{uuid(1)}"]
    assert "NVML cannot be read (nvidia-ml-py is not installed)" in report.note()


def test_the_inventory_is_read_through_nvml_with_mig_instances_processes_and_unsupported_fields():
    fake = FakeNvml([FakeGpu(mig=None, pids=[10, 11]), FakeGpu(name="NVIDIA A100-SXM4-80GB", mig=True,
                                                              mig_uuids=["MIG-abc"])])  # fmt: skip
    inventory = read_inventory(Nvml(fake))
    assert (inventory.driver, inventory.cuda_driver, inventory.error) == ("550.54.15", "12.4", None)
    first, second = inventory.gpus
    assert (first.name, first.mig, first.pids) == (H100, False, (10, 11))  # MIG NOT_SUPPORTED: no MIG
    assert (second.mig, second.mig_uuids) == (True, ("MIG-abc",))


def test_an_nvml_that_fails_after_start_keeps_the_gpus_it_listed_and_says_so_once():
    fake = FakeNvml([FakeGpu(), FakeGpu()])
    nvml = Nvml(fake)
    told: list[str] = []
    first = read_inventory(nvml)
    report = resolve(first, TorchView(**TORCH, gpus=tuple(TorchGpu(i, H100, g.uuid[4:]) for i, g in
                                                           enumerate(first.gpus))), None)  # fmt: skip
    pool = GpuPool(shared=False, report=report, inventory=lambda: read_inventory(nvml), log=told.append)
    fake.fail_with = LIB_RM_VERSION_MISMATCH  # the driver was upgraded under a running runner
    pool.refresh(force=True)
    pool.refresh(force=True)
    assert pool.free([]) == [0, 1] and len(told) == 1 and "NVML error 18" in told[0]


def test_this_machine_is_cpu_only_torch_read_without_importing_torch():
    build = torch_build()
    assert build is not None and build[1] is None  # torch 2.13 CPU here
    start = time.monotonic()
    view = probe_torch()
    assert view.cuda is None and not view.available and time.monotonic() - start < 1.0  # no subprocess needed


def test_submit_cuda_here_is_refused_before_queueing_with_the_reason(engine):
    proc = subprocess.run([sys.executable, "-m", "runner", "submit", "--strategy", "single", "--model", "tiny",
                           "--device", "cuda", "--json"], cwd=REPO, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    (problem,) = json.loads(proc.stdout)["problems"]
    assert problem["field"] == "device" and "is a CPU-only build" in problem["message"]
    assert "NVML is unavailable" in problem["message"]  # no NVIDIA driver library on this machine either
    from runner import api

    assert api.count_runs(engine) == 0


def test_gpu_calibration_takes_every_free_gpu_by_uuid_and_never_one_a_run_or_another_process_holds(engine,
                                                                                                    monkeypatch):  # fmt: skip
    # 4 GPUs: GPU 0 booked by a running run of this host, GPU 2 used by another user's process; 1 and 3 are free.
    from runner.planner import calibrate
    from runner.service import device_probe
    from storage import runner_rows

    report = resolve(machine(4, **{"2": {"pids": (4242,)}}), torch_sees(0, 1, 2, 3), None)
    monkeypatch.setattr(device_probe, "detect_devices", lambda **_: report)
    run_id = runs_submit(engine)
    assert runner_rows.claim_run(engine, run_id, "runner-x", "/tmp/run", [0])
    calls = {}
    monkeypatch.setattr(calibrate, "measure_matmul", lambda device, size, dtype, gpu=None: calls.setdefault(
        "matmul", []).append((device, size, gpu)) or {"flops": 1e15, "name": H100})  # fmt: skip
    monkeypatch.setattr(calibrate, "measure_allreduce", lambda device, mib, ranks, gpus: calls.setdefault(
        "allreduce", (device, mib, ranks, gpus)) and {"busbw": 3e11})  # fmt: skip
    cal = calibrate.calibrate("auto", size=1024, mib=16, engine=engine)
    free = [f"GPU-{uuid(1)}", f"GPU-{uuid(3)}"]
    assert calls["matmul"] == [("cuda", 8192, free[0]), ("cuda", 8192, free[0])]  # float32, bfloat16
    assert calls["allreduce"] == ("cuda", 256, 2, free)  # at least 256 MiB: the link's figure, not launch latency
    assert (cal.device, cal.allreduce_ranks, cal.backend) == ("cuda", 2, "nccl")
    runner_rows.claim_run(engine, runs_submit(engine), "runner-x", "/tmp/run2", [1, 3])
    with pytest.raises(RuntimeError) as exc:
        calibrate.calibrate("cuda", engine=engine)
    assert str(exc.value) == ("no free GPU to calibrate: GPUs 0, 1, 3 are booked by running runs; GPU 2 busy (pid "
                              "4242 not started by this runner)")


def runs_submit(engine) -> int:
    from runner import api

    return api.submit(engine, RunSpec(strategy="single", model="tiny"), gpu_count=None)
