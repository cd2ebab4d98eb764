"""The real job, except that rank 1 ignores SIGTERM: what a cancel must still stop (launched by torchrun).

`torchrun ... -m tests.stubborn_job RUN_DIR/spec.json`, as the runner launches runner.job.
"""

from __future__ import annotations

import os
import signal
import sys

from runner.job import main

if __name__ == "__main__":
    if os.environ.get("RANK") == "1":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    code = main()
    sys.stdout.flush()
    os._exit(code)
