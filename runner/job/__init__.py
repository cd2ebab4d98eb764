"""One rank process (`torchrun -m runner.job RUN_DIR/spec.json`): build its part of the model, verify,
timed steps, metrics, resources, checkpoints (`rank` is the entry). Its torch-free helpers (metrics,
schedule_ops, checkpoint headers) are also read by the planner and the pages; importing this package
imports nothing."""
