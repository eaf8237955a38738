"""Finished runs: compare them, and use one (predict with its adapter, or merge it into its base model).

``compare`` reads the MLflow record into one table (best run, Pareto front, seed means) and plots; ``inference``
finds a run (an id, a sweep's best, a local directory) and rebuilds its model from the run's own artifacts;
``predict`` and ``export`` are the two uses of it. The entry points are ``python -m src.compare``, ``src.predict``
and ``src.export``. This package builds on the core (``src.config``, ``src.data``, ``src.tracking``, ...) and
knows nothing of sweeps beyond the tags their runs carry.
"""
