"""NVML failures never stall anything: one NVML per process, initialised once; a failing NVML recorded, backed off
and retried; a field a device does not support is None; a MIG instance refused; the node sampler writes down what
went wrong instead of dying silently. NVML is a described machine behind pynvml's interface (tests/fake_nvml.py)."""

from __future__ import annotations

import io

from runner.service.node_telemetry import Told, write_samples
from runner.service.nvml import BACKOFF_MAX_S, Nvml
from runner.service.telemetry import Sampler
from tests.fake_nvml import LIB_RM_VERSION_MISMATCH, FakeGpu, FakeNvml


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_nvml_is_initialised_once_for_every_sample_of_every_job():
    fake = FakeNvml([FakeGpu(used=3 * 2**30, util=40), FakeGpu(util=None)])
    nvml = Nvml(fake)
    jobs = [Sampler(1, 0.0, gpu_uuids=[fake.gpus[0].uuid], nvml=nvml),
            Sampler(2, 0.0, gpu_uuids=[fake.gpus[1].uuid], nvml=nvml)]  # fmt: skip
    for _ in range(5):
        first, second = (job.sample() for job in jobs)
    assert (fake.inits, fake.shutdowns) == (1, 0)  # not per sample, not per job
    assert [(r["source"], r["util_pct"], r["mem_bytes"]) for r in first] == [("gpu0", 40.0, 3 * 2**30)]
    # Utilisation NOT_SUPPORTED on that device: the field is None, NVML is fine, memory is still read.
    assert [(r["util_pct"], r["mem_bytes"]) for r in second] == [(None, 2**30)] and nvml.error is None


def test_a_failing_nvml_is_recorded_backed_off_and_retried_without_raising():
    fake, clock = FakeNvml([FakeGpu()]), Clock()
    nvml = Nvml(fake, clock)
    job = Sampler(1, 0.0, gpu_uuids=[fake.gpus[0].uuid], nvml=nvml)
    assert len(job.sample()) == 1
    fake.fail_with = LIB_RM_VERSION_MISMATCH  # the driver was upgraded under the runner
    assert job.sample() == [] and nvml.failures == 1 and "NVML error 18" in nvml.error
    assert fake.shutdowns == 1  # shut down, so the retry initialises it afresh
    calls = fake.calls
    for _ in range(10):  # ten ticks inside the first second of back-off: NVML is not asked once
        assert job.sample() == []
    assert fake.calls == calls
    clock.now += 1.0
    assert job.sample() == [] and fake.calls == calls + 1 and nvml.failures == 2  # retried once, failed again
    assert nvml.retry_at - clock.now == 2.0  # the wait doubles
    for _ in range(20):
        clock.now = nvml.retry_at
        job.sample()
    assert nvml.retry_at - clock.now == BACKOFF_MAX_S  # and stops doubling at its cap
    fake.fail_with = None
    clock.now = nvml.retry_at
    assert len(job.sample()) == 1 and nvml.error is None and nvml.failures == 0 and fake.inits == 2


def test_without_nvml_a_sample_is_empty_and_says_why():
    class NoNvml:  # nvmlInit fails as on a machine without the driver's library
        class NVMLError(Exception):
            value = 12

        def nvmlInit(self):
            raise self.NVMLError("NVML Shared Library Not Found")

        def nvmlShutdown(self):
            pass

    nvml = Nvml(NoNvml())
    assert Sampler(1, 0.0, gpu_uuids=["GPU-x"], nvml=nvml).sample() == []
    assert nvml.error == "NVMLError: NVML Shared Library Not Found"


def test_the_node_sampler_finds_a_whole_gpu_by_torchs_bare_uuid_and_refuses_a_mig_instance():
    fake = FakeNvml([FakeGpu(), FakeGpu(mig=True, mig_uuids=["MIG-0badc0de-1111-2222-3333-444455556666"])])
    sampler = Sampler(1, 0.0, gpu_uuids=[fake.gpus[0].uuid[4:], "0badc0de-1111-2222-3333-444455556666"],
                      nvml=Nvml(fake))  # fmt: skip
    out, log = io.StringIO(), io.StringIO()
    told = Told(log)
    for _ in range(3):
        write_samples(sampler, out, "n1", told)
    assert [line.count('"source": "gpu0"') for line in out.getvalue().splitlines()] == [1, 1, 1]  # only the GPU
    (said,) = log.getvalue().splitlines()  # told once, not every second
    assert "gpu1: cuda:1 is a MIG instance (MIG-0badc0de" in said and "in MIG mode" in said


def test_the_node_sampler_writes_down_a_failing_nvml_and_a_broken_sample_and_goes_on():
    fake = FakeNvml([FakeGpu()])
    fake.fail_with = LIB_RM_VERSION_MISMATCH
    sampler = Sampler(1, 0.0, gpu_uuids=[fake.gpus[0].uuid], nvml=Nvml(fake))
    out, log = io.StringIO(), io.StringIO()
    told = Told(log)
    assert write_samples(sampler, out, "n1", told) == 0

    class Broken(Sampler):
        def sample(self):
            raise OSError("no such file: /proc/1/stat")

    assert write_samples(Broken(1, 0.0), out, "n1", told) == 0  # no exception: the loop goes on
    said = log.getvalue().splitlines()
    assert len(said) == 2 and "NVML: NVMLError: NVML error 18; GPU telemetry is retried after a back-off" in said[0]
    assert said[1].endswith("sampling failed: OSError: no such file: /proc/1/stat") and out.getvalue() == ""
