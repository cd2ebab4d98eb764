"""`torchrun ... -m runner.job RUN_DIR/spec.json`: one rank of a run (the code is runner/job/rank.py)."""

from runner.job.rank import exit_without_finalising, main

exit_without_finalising(main())
