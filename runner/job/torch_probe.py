"""`python -m runner.job.torch_probe`: torch's CUDA as this Python sees it, one JSON line on stdout.

Run by runner/service/device_probe.py in the runner's own Python and environment, so it sees what a rank will:
torch.__version__ and torch.version.cuda, the text torch.cuda.init() raises where CUDA cannot start ("Torch not
compiled with CUDA enabled", "The NVIDIA driver on your system is too old (found version ...)", "Found no NVIDIA
driver on your system", "No CUDA GPUs are available"), and for each device torch sees its ordinal, name, memory
and UUID (torch.cuda.get_device_properties(i).uuid, bare: a MIG instance's looks like a whole GPU's), and NCCL's
version. Any failure is an answer too (`error`), never a traceback instead of the line.
"""

from __future__ import annotations

import json
import warnings


def probe() -> dict:
    out: dict = {"version": None, "cuda": None, "available": False, "gpus": [], "error": None, "nccl": None}
    try:
        import torch

        out["version"], out["cuda"] = torch.__version__, torch.version.cuda
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # is_available() warns with the text init() raises below
            try:
                torch.cuda.init()
            except Exception as exc:  # noqa: BLE001 -- its text is the answer
                out["error"] = f"{exc}".strip() or type(exc).__name__
            out["available"] = torch.cuda.is_available()
        if out["available"]:
            for i in range(torch.cuda.device_count()):
                p = torch.cuda.get_device_properties(i)
                out["gpus"].append({"index": i, "name": p.name, "uuid": str(p.uuid), "memory_total": int(p.total_memory)})
            import torch.distributed as dist

            if dist.is_available() and dist.is_nccl_available():
                v = torch.cuda.nccl.version()
                out["nccl"] = ".".join(map(str, v)) if isinstance(v, tuple) else str(v)
    except Exception as exc:  # noqa: BLE001 -- a broken torch install is an answer as well
        out["error"] = f"{type(exc).__name__}: {exc}"
    return out


if __name__ == "__main__":
    print(json.dumps(probe()))
