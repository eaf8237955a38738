"""Benchmarks: what the project's trainers cost against the seed tutorials' recipes, measured on one process.

``sft`` (the seeds' QLoRA SFT recipe against the fast path), ``classification`` (the seeds' classifier recipes against
the flat-batch classifier), ``packs`` (trials one by one against one trial pack), ``common`` (what they share: the
meter, workloads, memory readings). ``results/`` holds what they measured, dated, with the device log. They build on
``src`` and are not imported by it (``python -m src.bench`` forwards here).
"""
