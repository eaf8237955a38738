"""The train entrypoint: compose, validate, then one run, one job of a sweep, or one run on several GPUs.

    python -m src.train                                   # tiny model, bundled data, CPU
    python -m src.train model=openllama3b quant=4bit lora=all_linear data=red_dot train=gpu
    python -m src.train --multirun lora.r=8,16 lora=attn_qv,all_linear
    python -m src.train data=instructions train.nproc_per_node=2   # one run on 2 GPUs (DDP, torchrun)

Every run is an MLflow run (see ``src/tracking.py`` for the names). The config is validated here, before any model
loads; a run that fails ends FAILED with the reason. One run is :func:`src.fit.run`; a sweep's job is
:func:`src.sweeps.job.run_job` (or :func:`src.sweeps.job.run_pack_job` for a trial pack).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional, Union

import hydra
from omegaconf import DictConfig

from src import console, distributed, overrides, tracking
from src.config import CONF_DIR, Config, ConfigError, refuse_unresolved, resolve, validate
from src.errors import StoreError, exit_on_user_error, report
from src.sweeps import configs as sweep_configs  # registers the hydra/sweeper and hydra/launcher configs
from src.sweeps.grouping import PACK_ENV, read_pack
from src.sweeps.job import run_job, run_pack_job, validated_job
from src.sweeps.outcomes import quote


def validated_or_exit(raw: dict, unresolved: Optional[dict[str, str]] = None) -> Config:
    """Validate a config before anything heavy: the error shows at once (a model load or an MLflow store
    takes seconds), and an invalid config still ends as a FAILED run (:func:`src.tracking.record_invalid`),
    unless its store is what is broken or unknown (``unresolved``: :func:`src.config.resolve`'s problems); then
    exit 2. Below this point only the validated Config travels: it keeps the resolved dict (``Config.resolved``)."""
    try:
        refuse_unresolved(unresolved or {})
        return validate(raw, for_training=True)
    except ConfigError as exc:
        report(exc)  # before the store is opened, which takes seconds
        unknown = sorted(k for k in unresolved or {} if k.startswith("tracking."))
        try:
            if unknown:
                raise StoreError(f"the run is not recorded: {', '.join(unknown)} cannot be resolved")
            tracking.record_invalid(raw, exc)
        except StoreError as store:
            console.say(f"  ({store})")
        sys.exit(2)


def relaunch_argv(argv: list[str], output_dir: str) -> list[str]:
    """The command line again, pinned to this run's output directory (else each rank picks its own time)."""
    kept = [arg for arg in argv if not arg.lstrip("+~").startswith("hydra.run.dir=")]
    return [*kept, f"hydra.run.dir={quote(output_dir)}"]


def preflight(argv: list[str]) -> None:
    """Before Hydra reads the command line: ``--help`` prints the groups and keys (from the schema's help, which
    Hydra's own help cannot show), and a mistyped key or group option exits 2 naming the closest ones (where
    Hydra would advise adding the key with +). Hydra's own flags and syntax errors are Hydra's."""
    line = overrides.parse_command_line(argv)
    primary = overrides.primary_dir(line.config_path, CONF_DIR, Path(__file__).parent)
    extra = Path(line.config_dir) if line.config_dir else None
    groups = overrides.group_options(primary, line.config_name or "config", extra)
    if line.help:
        print(overrides.help_text("python -m src.train", Config, groups))
        sys.exit(0)
    problems = overrides.problems(line.overrides, Config, groups)
    if problems:
        console.say(f"error: {ConfigError(problems)}")
        sys.exit(2)


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> Union[float, dict, None]:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    raw, unresolved = resolve(cfg)
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode == RunMode.MULTIRUN:
        # One job of a sweep: in a fresh process unless hydra.sweeper.isolate=false; errors (an invalid config
        # included) go to the sweeper, which records them and goes on. Returns the run id and its final metrics.
        job = sweep_configs.job_conf(hydra_cfg.sweeper)
        members = os.environ.get(PACK_ENV)
        if members:  # a pack (hydra.sweeper.pack): this job's config and the others', trained on one base
            slots, listed = read_pack(members)
            jobs = [(raw if i == 0 else m["raw"], m["env"] or None) for i, m in enumerate(listed)]
            return run_pack_job(jobs, isolate=job.isolate, feasibility=job.feasibility, slots=slots)
        config = validated_job(raw, unresolved)
        return run_job(config, isolate=job.isolate, feasibility=job.feasibility)
    config = validated_or_exit(raw, unresolved)
    nproc = config.train.nproc_per_node
    if nproc > 1 and not distributed.under_torchrun():  # DDP: the same command on nproc ranks
        sys.exit(distributed.relaunch(nproc, relaunch_argv(sys.argv[1:], hydra_cfg.runtime.output_dir)))
    # A UserError (bad data, a model that is not there, a broken store...) is one line and exit 2; the run, if it
    # started, ended FAILED with it (tracking.tracked_run). Anything else is a bug and keeps its traceback.
    from src.fit import run  # torch and transformers load here, after the config is known to be valid

    return exit_on_user_error(lambda: run(config))


if __name__ == "__main__":
    preflight(sys.argv[1:])
    main()
    distributed.exit_worker()  # a DDP rank whose run is complete leaves without tearing down its process group
