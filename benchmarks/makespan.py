"""Sweep makespan: the wall time of a whole sweep, run as users run it, one job at a time against trial packs.

python -m src.bench --workload w3b-4bit-grid16               # a grid of 16 jobs: pack=1, then pack=4
python -m src.bench --workload w3b-4bit-study16              # a study of 16 trials: pack=1, then pack=4 + pruning
python -m src.bench --workload w3b-4bit-grid8 --examples 512   # 8 jobs (alpha 2r): within one 600-s device call
python -m src.bench --workload tiny-grid4 --device cpu --examples 16    # their smoke tests (4 jobs, pack 2)
python -m src.bench --workload tiny-study4 --device cpu --examples 16

Each side is one real ``python -m src.train --multirun ...`` subprocess, timed from its start to its exit (process
starts, base loads, evaluations and the sweep's own bookkeeping included), the two sides one after the other in this
process. Both train on the pack workloads' random-weight base and synthetic instruction rows
(:func:`benchmarks.packs.pack_overrides`), with the MLflow store, the Optuna storage and the sweep dirs in a
throwaway work dir.

The space is LoRA r x targets (q,v ; every linear layer + ``lm_head``) x alpha in {r, 2r}. A grid's alpha refers to
its r, which Hydra's cartesian product cannot say, so a grid is one explicit row per job (``hydra.sweeper.rows``). A
study draws ``lora.alpha_ratio`` and derives alpha (``hydra.sweeper.derived``, as ``sweeps/rank_alpha.yaml`` does),
and draws the targets as ``lora.target_modules`` lists (``[attn_qv]`` trains the layers ``lora=attn_qv`` does).
The study's sampler is Optuna's random sampler, seeded: trials are asked in the same order on both sides, one by one
or 4 x pack at once, so both sides train the same trials and only pruning and packing tell their best apart.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parents[1]  # src.train runs from the project, as users run it
TARGETS = ("lora=attn_qv", "lora=all_linear lora.target_modules=[all_linear,lm_head]")  # a grid row's targets
STUDY_TARGETS = "choice([attn_qv], [all_linear, lm_head])"  # the same layers as a study's lora.target_modules
STUDY_SEED = 0  # with this seed the random sampler draws all 16 points of the GPU space in 16 trials


@dataclass(frozen=True)
class SweepWorkload:
    name: str
    base: str  # a benchmarks.workloads workload: the architecture and base bits
    kind: str  # grid | study
    ranks: tuple[int, ...]
    alpha_ratios: tuple[int, ...]  # alpha = ratio x r
    pack: int  # the packed side's hydra.sweeper.pack (the sequential side's is 1)
    trials: int = 0  # a study's n_trials (a grid trains every point of its space)
    min_resource: int = 1  # a study's packed side: successive halving's first rung, and its train.eval_steps
    overrides: tuple[str, ...] = ()  # the workload's own settings, after the shared ones (pack_overrides)

    @property
    def jobs(self) -> int:
        """The jobs (grid) or trials (study) each side trains."""
        return self.trials if self.kind == "study" else len(grid_rows(self))


@dataclass(frozen=True)
class Side:
    name: str
    pack: int
    pruner: str  # hydra/sweeper/pruner: nop | successive_halving (a study only)


W3B_RANKS, GPU_TRAIN = (4, 8, 16, 32), ("train=gpu",)  # w3b-4bit-pack4's recipe: the seeds' batch 8, lr 2e-4
# Batches of 4: a few steps a trial (3 on 16 rows), so a trial has rungs to be pruned at;
# 16 eval rows of the 128, so the packed study's evaluation at every step costs little.
TINY_TRAIN = ("train.per_device_train_batch_size=4", "data.eval_subsample=16")
MAKESPAN_WORKLOADS = {
    w.name: w
    for w in (
        # 256 steps a job (2048 rows, batch 8): the packed study evaluates, and may prune, at steps 32, 64 and 128.
        SweepWorkload("w3b-4bit-grid16", "w3b-4bit", "grid", W3B_RANKS, (1, 2), pack=4, overrides=GPU_TRAIN),
        SweepWorkload(
            "w3b-4bit-study16",
            "w3b-4bit",
            "study",
            W3B_RANKS,
            (1, 2),
            pack=4,
            trials=16,
            min_resource=32,
            overrides=GPU_TRAIN,
        ),
        # The grid within one device call (600 s): 8 jobs (alpha 2r), meant for --examples 512 (64 steps a job).
        # Base loads weigh more here than in the 16-job grid of 2,048 rows; the result says so by its size.
        SweepWorkload("w3b-4bit-grid8", "w3b-4bit", "grid", W3B_RANKS, (2,), pack=4, overrides=GPU_TRAIN),
        SweepWorkload("tiny-grid4", "tiny", "grid", (4,), (1, 2), pack=2, overrides=TINY_TRAIN),
        SweepWorkload(
            "tiny-study4", "tiny", "study", (4, 8), (1, 2), pack=2, trials=4, min_resource=1, overrides=TINY_TRAIN
        ),
    )
}


def sides_of(workload: SweepWorkload) -> tuple[Side, Side]:
    """The sequential side (pack=1, no pruner) and the packed one (a study's prunes by successive halving)."""
    pruner = "successive_halving" if workload.kind == "study" else "nop"
    return Side("sequential", 1, "nop"), Side("packed", workload.pack, pruner)


def grid_rows(workload: SweepWorkload) -> list[str]:
    """One ``hydra.sweeper.rows`` item per job: targets x r x alpha (a ratio of that r)."""
    return [
        f"{targets} lora.r={r} lora.alpha={ratio * r}"
        for targets in TARGETS
        for r in workload.ranks
        for ratio in workload.alpha_ratios
    ]


def grid_overrides(workload: SweepWorkload, side: Side) -> list[str]:
    """The grid's rows and the side's pack, as sweeper overrides."""
    rows = ",".join(f"'{row}'" for row in grid_rows(workload))
    return [f"hydra.sweeper.rows=[{rows}]", f"hydra.sweeper.pack={side.pack}"]


def study_overrides(workload: SweepWorkload, side: Side, work: Path) -> list[str]:
    """The study's seeded sampler, storage and the side's pack and pruner; a pruned side evaluates at the pruner's
    rungs. The search space is in the study's config file (:func:`write_study_config`)."""
    overrides = [
        "hydra/sweeper/sampler=random",
        f"hydra.sweeper.sampler.seed={STUDY_SEED}",
        f"hydra.sweeper.n_trials={workload.trials}",
        f"hydra.sweeper.storage={study_storage(work)}",
        f"hydra.sweeper.study_name={workload.name}-{side.name}",
        f"hydra.sweeper.pack={side.pack}",
        f"hydra/sweeper/pruner={side.pruner}",
    ]
    if side.pruner != "nop":
        overrides += [f"hydra.sweeper.pruner.min_resource={workload.min_resource}", "train.eval_strategy=steps"]
        overrides.append(f"train.eval_steps={workload.min_resource}")
    return overrides


def write_study_config(workload: SweepWorkload, work: Path) -> Path:
    """The study's sweep file, as ``sweeps/rank_alpha.yaml`` is written, in ``work``; its path.

    A file, not the command line: ``hydra.sweeper.params`` and ``derived`` are null by default, and Hydra cannot
    merge a dict given on the command line into a null node (``lora.alpha_ratio``, no config key, must be in
    ``params``)."""
    ranks, ratios = ", ".join(map(str, workload.ranks)), ", ".join(map(str, workload.alpha_ratios))
    path = work / f"{workload.name}.yaml"
    path.write_text(
        f"# python -m src.train -cd {work} -cn {workload.name}   (written by benchmarks/makespan.py)\n"
        "defaults:\n  - config\n  - override hydra/sweeper: lora_optuna\n  - _self_\n\n"
        "hydra:\n  searchpath:\n    - file://${project_root:}/conf\n  mode: MULTIRUN\n  sweeper:\n"
        f"    params:\n      lora.r: choice({ranks})\n      lora.alpha_ratio: choice({ratios})\n"
        f"      lora.target_modules: {STUDY_TARGETS}\n"
        "    derived:\n      lora.alpha: lora.alpha_ratio * lora.r\n"
    )
    return path


def study_storage(work: Path) -> str:
    return f"sqlite:///{work / 'optuna.db'}"


def sweep_command(workload: SweepWorkload, side: Side, common: list[str], work: Path) -> list[str]:
    """The side's ``python -m src.train --multirun`` command line, its runs in their own MLflow experiment."""
    command = [sys.executable, "-m", "src.train", "--multirun"]
    if workload.kind == "study":
        config = write_study_config(workload, work)
        command += ["-cd", str(config.parent), "-cn", config.stem, *common, *study_overrides(workload, side, work)]
    else:
        command += [*common, *grid_overrides(workload, side)]  # after common: a side's own settings win
    where = [f"tracking.experiment={workload.name}-{side.name}", f"hydra.sweep.dir={work / side.name / 'multirun'}"]
    return [*command, *where]


def run_sweep(command: list[str], tracking_uri: str) -> tuple[float, int]:
    """Run one sweep as a subprocess (its output on this process's); its wall seconds and exit code."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri}
    start = time.perf_counter()
    returncode = subprocess.run(command, cwd=ROOT, env=env, check=False).returncode
    return time.perf_counter() - start, returncode


def child_runs(tracking_uri: str, experiment: str) -> list[dict[str, Any]]:
    """The sweep's job runs (its parent left out) by name, the same order on both sides: name, MLflow status, final
    eval_loss."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    runs = client.search_runs([found.experiment_id], max_results=1000) if found else []
    children = sorted((r for r in runs if "mlflow.parentRunId" in r.data.tags), key=lambda r: r.info.run_name)
    return [
        {"run_name": r.info.run_name, "status": r.info.status, "eval_loss": r.data.metrics.get("eval_loss")}
        for r in children
    ]


def study_outcome(storage: str, study_name: str) -> dict[str, Any]:
    """The study's trials that reached an outcome (duplicate proposals left out): their states, and the best value."""
    from collections import Counter

    import optuna

    from src.sweeps.study_trials import counted

    if study_name not in optuna.study.get_all_study_names(storage):  # the sweep failed before it began
        return {"states": {}, "best": None, "trials": []}
    trials = [t for t in optuna.load_study(study_name=study_name, storage=storage).trials if counted(t)]
    values = [t.value for t in trials if t.state.name == "COMPLETE"]
    return {
        "states": dict(Counter(t.state.name for t in trials)),
        "best": min(values) if values else None,  # eval_loss, the SFT objective: lower is better
        "trials": [{"number": t.number, "state": t.state.name, "params": t.params, "value": t.value} for t in trials],
    }


def store_uri(work: Path) -> str:
    return f"sqlite:///{work / 'mlflow.db'}"


def create_stores(work: Path) -> None:
    """Create the MLflow store and the Optuna storage before either side is timed: the first sweep to find them
    missing would spend seconds building their tables, which the second would not."""
    import mlflow
    import optuna

    mlflow.MlflowClient(store_uri(work)).search_experiments()
    optuna.storages.RDBStorage(study_storage(work))


def run_side(workload: SweepWorkload, side: Side, common: list[str], work: Path) -> dict[str, Any]:
    """One side's sweep, timed, and what it left in MLflow (and Optuna)."""
    command = sweep_command(workload, side, common, work)
    wall, returncode = run_sweep(command, store_uri(work))
    runs = child_runs(store_uri(work), f"{workload.name}-{side.name}")
    result: dict[str, Any] = {"pack": side.pack, "pruner": side.pruner, "wall_s": wall, "returncode": returncode}
    result.update(finished=sum(r["status"] == "FINISHED" for r in runs), runs=runs)
    result["command"] = shlex.join(["python", *command[1:]])  # to run the side again by hand (while work exists)
    if workload.kind == "study":
        result.update(study_outcome(study_storage(work), f"{workload.name}-{side.name}"))
    return result


def run_makespan_workload(workload: SweepWorkload, examples: int, device: str, model_root: Path, work: Path) -> dict:
    """Both sides of a makespan workload, one after the other; their wall times, outcomes and speedup."""
    from benchmarks.packs import pack_overrides, reset_peak, text_checkpoint, write_rows
    from benchmarks.workloads import WORKLOADS, ensure_checkpoint

    base = WORKLOADS[workload.base]
    model_dir = text_checkpoint(ensure_checkpoint(base, model_root, device))
    reset_peak(device)  # the checkpoint's build leaves no cached GPU memory to the sweeps
    common = pack_overrides(workload.overrides, base, model_dir, write_rows(work / "data", examples), device)
    create_stores(work)
    sides = {side.name: run_side(workload, side, common, work) for side in sides_of(workload)}
    result = {"workload": workload.name, "kind": workload.kind, "examples": examples, "jobs": workload.jobs}
    result["sides"] = sides
    sequential, packed = sides["sequential"], sides["packed"]
    result["speedup"] = sequential["wall_s"] / packed["wall_s"]
    if workload.kind == "study":
        result["best_rel_diff"] = rel_diff(sequential["best"], packed["best"])
    else:  # the same jobs on both sides: how far packing moved each one's eval_loss
        alone = {run["run_name"]: run["eval_loss"] for run in sequential["runs"]}
        result["eval_loss_rel_diff"] = [rel_diff(alone.get(r["run_name"]), r["eval_loss"]) for r in packed["runs"]]
    return result


def rel_diff(reference: Optional[float], value: Optional[float]) -> Optional[float]:
    """``|value - reference| / |reference|``; None where either is missing."""
    if reference is None or value is None:
        return None
    return abs(value - reference) / abs(reference)


def side_outcome(side: dict) -> str:
    """A study side's trial states and best eval_loss, or a grid side's eval_loss per job; and a failed sweep's code."""
    if "states" in side:
        outcome = f"{side['states']}, best eval_loss {table_cell(side['best'])}"
    else:
        outcome = "eval_loss " + ", ".join(table_cell(run["eval_loss"]) for run in side["runs"])
    return outcome if side["returncode"] == 0 else f"{outcome} (the sweep exited {side['returncode']})"


def table_cell(value: Optional[float], spec: str = ".4f") -> str:
    """A value of the printed table in a fixed format, ``-`` where it is missing (a failed job's eval_loss)."""
    return "-" if value is None else format(value, spec)


def format_makespan(result: dict) -> str:
    """A line a side (its pack, pruner, wall time, jobs finished and outcome), then the speedup."""
    unit = "trials" if result["kind"] == "study" else "jobs"
    lines = [
        f"{result['workload']}: a {result['kind']} of {result['jobs']} {unit}, {result['examples']} examples each",
        f"{'side':<11} {'pack':>4} {'pruner':<19} {'wall s':>8} {'finished':>8}  outcome",
    ]
    for name, side in result["sides"].items():
        lines.append(
            f"{name:<11} {side['pack']:>4} {side['pruner']:<19} {side['wall_s']:>8.1f} {side['finished']:>8}  "
            f"{side_outcome(side)}"
        )
    line = f"packed is {result['speedup']:.2f}x faster"
    if "best_rel_diff" in result:
        line += f"; its best eval_loss differs by {table_cell(result['best_rel_diff'], '.2%')}"
    else:
        line += f"; eval_loss differences: {', '.join(table_cell(d, '.2%') for d in result['eval_loss_rel_diff'])}"
    return "\n".join([*lines, line])


def makespan_main(argv: list[str]) -> int:
    """Run one makespan workload in a throwaway work dir; print and save its result. 1 if a sweep failed."""
    import tempfile

    from benchmarks.packs import workload_parser, write_result

    args = workload_parser(
        "A whole sweep's wall time: one job at a time against packs.", MAKESPAN_WORKLOADS
    ).parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="lora-bench-makespan-") as work:
        workload = MAKESPAN_WORKLOADS[args.workload]
        result = run_makespan_workload(workload, args.examples, args.device, args.model_dir, Path(work))
    print(format_makespan(result))
    write_result(result, args.device, args.json)
    return 0 if all(side["returncode"] == 0 for side in result["sides"].values()) else 1
