"""The runner process (`python -m runner serve`, one per host): claim -> launch -> watch -> ingest ->
finalize (`loop`), the launchers (local torchrun, Slurm), telemetry, logs, failure diagnosis, and starting a
runner when none is alive (`supervisor`). Torch-free."""
