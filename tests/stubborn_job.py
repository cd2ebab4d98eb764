"""The real job, except that rank 1 ignores SIGTERM and, once its peers are gone, hangs instead of exiting
(as a rank stuck in a collective would): what a cancel must still stop. Launched by torchrun, the real way:
`torchrun ... -m tests.stubborn_job RUN_DIR/spec.json`, as the runner launches runner.job.
"""

from __future__ import annotations

import os
import signal
import sys
import time

from runner.job.rank import main

if __name__ == "__main__":
    stubborn = os.environ.get("RANK") == "1"
    if stubborn:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    code = main()
    sys.stdout.flush()
    while stubborn:
        time.sleep(60)
    os._exit(code)
