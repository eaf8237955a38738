"""Sweeps: Hydra multirun grids and Optuna studies, each recorded as one MLflow parent run.

    python -m src.train --multirun lora.r=8,16 lora=attn_qv,all_linear quant=4bit,8bit   # a grid
    python -m src.train -cd sweeps -cn seed_table                                         # explicit rows
    python -m src.train -cd sweeps -cn rank_alpha hydra.sweeper.n_trials=40               # an Optuna study

Two Hydra sweepers, registered in Hydra's ConfigStore under ``hydra/sweeper``:

- ``lora_grid`` (the default in ``conf/config.yaml``): Hydra's basic sweeper (the cartesian product
  of the command line's ``a=1,2`` sweeps) plus ``rows``, a list of explicit jobs.
- ``lora_optuna`` (:mod:`src.sweeps.study`): an Optuna study; option names follow
  hydra-optuna-sweeper's (``n_trials``, ``n_jobs``, ``direction``, ``storage``, ``study_name``,
  ``sampler``, ``params``), which pins optuna<3.

Both create the MLflow parent run before launching; each job's run nests under it through the
environment that ``hydra.job.env_set`` gives the job (``LORA_SWEEP_PARENT_RUN_ID``,
``LORA_SWEEP_ID``, read by :func:`src.tracking.tracked_run`). Jobs go through Hydra's launcher,
so the basic, joblib and submitit launchers all work; a job runs in a fresh process unless
``hydra.sweeper.isolate=false`` (:mod:`src.sweeps.job`). A failing job never stops the sweep
(unless ``max_failure_rate`` is exceeded): it is recorded, the sweep goes on, and at the end a
summary names every failure and the exit code is 1. Parallel jobs (``n_jobs`` / ``max_batch_size``
with a parallel launcher) are pinned to their own GPUs through ``CUDA_VISIBLE_DEVICES``: one each, or
``train.nproc_per_node`` each for a DDP job; a batch holds only as many jobs as the GPUs can take.

Hydra only instantiates sweepers found under the ``hydra_plugins`` namespace: the classes Hydra
sees are the thin subclasses in ``hydra_plugins/lora_sweeps/sweepers.py``.

The modules, sweeper side first: ``configs`` (the Hydra configs and their defaults), ``base`` (what both sweepers
share: settings, setup, one launch path for jobs and packs), ``grid`` and ``study`` (the two sweepers), ``space``,
``study_trials``, ``study_report`` and ``importance`` (the study's search space, its trials' bookkeeping, its best
trials and artifacts, which params mattered), ``grouping`` (jobs into packs of one base),
``placement`` (GPUs per job), ``record`` (the parent run, the sweep's lines and summary), ``stale`` (runs a killed
process left RUNNING); ``outcomes`` (what jobs and sweepers tell each other: :class:`~src.sweeps.outcomes.JobResult`,
its status, the tag and attribute names); job side: ``job`` (one job: its process and result), ``feasibility``
(its memory check), and
:mod:`src.trial` (its Optuna trial: storage, pruner, pruning callback).
Sweeps build on the core (``src.config``, ``src.tracking``, ``src.memory``, ...) and ``src.fit`` (a job's run, imported
by name), never on ``src.train``; the core never imports a sweep module.
"""
