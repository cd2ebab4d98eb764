"""The planner (issue 15): which tp x pp x dp (x ZeRO) layout for this model on these devices.

Torch-free (the Streamlit app imports it):
- `memory`: bytes per device of a layout (parameters, gradients, AdamW state, activations, KV cache),
  the one memory model of the lab (runner/spec/estimates.py delegates to it);
- `step_time`: predicted step time from FLOPs, bytes and bandwidth, and the schedule's bubble;
- `devices`: what the layout runs on (presets, this host, a Slurm partition, described by hand);
- `layouts`: every layout of a device count, feasible ones ranked, infeasible ones with their reason;
- `cli`: `python -m runner plan`;
- `calibrate`: measuring this host's matmul rate and all-reduce bandwidth (the measurement runs torch in
  a subprocess; importing the module does not import torch).
"""
