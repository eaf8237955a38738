"""Benchmarks: what the project's trainers cost against the seed tutorials' recipes, measured on one process.

``sft`` (the seeds' QLoRA SFT recipe against the fast path, and the command), ``classification`` (the seeds' classifier
recipes against the flat-batch classifier), ``packs`` (trials one by one against one trial pack), ``workloads`` (the
architectures, synthetic rows and random-weight checkpoints), ``common`` (what the sides share: the meter, the
profiler, memory readings). ``results/`` holds what they measured, dated, with the device log. They build on
``src`` and are not imported by it (``python -m src.bench`` forwards here).
"""
