"""What a run is, as plain data imported everywhere (the app, the CLI, the runner, the rank processes).

- `run_spec`: RunSpec, its parsing, the fields' choices, SpecProblem and SpecError;
- `validation`: `validate_spec(spec, ...)`, every problem at once, each naming its field and the fix
  (`runner.api.submit` calls it before anything is stored);
- `strategies/`: the strategy registry, one file per strategy;
- `estimates`: memory per rank and per host before launch (the planner's memory model);
- `records`: what crosses a process boundary (run states, events, rank figures, the result);
- `selftest_layouts`: the self-test's layouts and their communication theory.

Torch-free, and nothing here imports the runner process (`runner/service/`), the callers' side
(`runner/api.py`) or the rank process (`runner/job/`) but its checkpoint header reader.
"""
