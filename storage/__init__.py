"""Storage: the tables (models), the engine (db), migrations, and modules of one job each: runs (run rows the app
and CLI read and change), series (measurements read for charts), hosts (runner leases), runner_rows (what the runner
writes), ranks (per-rank figures <-> rows). It stores what it is given; validation happens before (runner/api.py)."""
