"""Capacity planning: what a recipe costs per GPU before it runs (FLOPs, memory, step time, largest micro-batch).

- `costs.py`: per part, the analytic FLOPs of one sample and the bytes autograd keeps (per component family);
- `plan.py`: one training step of a stage-2 system under a sharding strategy, a precision and activation
  checkpointing: memory per GPU by kind and by phase, FLOPs and time per step, the largest micro-batch that fits;
- `measure.py`: what the model is checked against on any device (live tensor bytes, the FLOP counter).

`benchmarks/plan.py` reads a recipe and prints the plan; docs/scale.md states the assumptions.
"""
