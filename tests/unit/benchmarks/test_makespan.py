"""src.bench's sweep makespan workloads (benchmarks/makespan.py): a whole sweep as subprocesses, pack=1 against packs.

The numbers mean nothing on a CPU; the code paths are the GPU run's: the grid's explicit rows, the study's sweep file
with its derived alpha and seeded sampler, both sweeps run by ``python -m src.train --multirun`` and read back from
their MLflow store and Optuna storage.
"""

from __future__ import annotations

import json
import shlex

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser

from benchmarks import makespan
from benchmarks.makespan import MAKESPAN_WORKLOADS


def test_the_grid_is_every_rank_target_and_alpha_r_or_2r():
    """The rows as the grid sweeper reads them (``src.sweeps.grid.grid_jobs``), each composed into a real config."""
    from src.config import compose, validate
    from src.sweeps.grid import grid_jobs

    workload = MAKESPAN_WORKLOADS["w3b-4bit-grid16"]
    jobs = grid_jobs(OverridesParser.create(), [], makespan.grid_rows(workload))
    loras = [validate(compose(job), for_training=True).lora for job in jobs]
    points = {(lora.r, lora.alpha / lora.r, tuple(lora.target_modules or [lora.preset])) for lora in loras}
    targets = {("attn_qv",), ("all_linear", "lm_head")}
    assert points == {(r, ratio, t) for r in (4, 8, 16, 32) for ratio in (1, 2) for t in targets}
    assert len(jobs) == workload.jobs == 16


def test_the_seeded_study_draws_every_point_of_the_gpu_space(tmp_path):
    """16 trials over a space of 16 points: with :data:`STUDY_SEED`, the random sampler reaches the last point before
    the sweeper gives up on duplicates (50 in a row), asked as the sweeper asks (its space, from the sweep file)."""
    import optuna
    from omegaconf import OmegaConf

    from src.sweeps.space import search_space
    from src.sweeps.study import MAX_DUPLICATE_PROPOSALS

    workload = MAKESPAN_WORKLOADS["w3b-4bit-study16"]
    params = OmegaConf.load(makespan.write_study_config(workload, tmp_path)).hydra.sweeper.params
    space, fixed = search_space(OverridesParser.create(), OmegaConf.to_container(params), [])
    assert fixed == [] and set(space) == {"lora.r", "lora.alpha_ratio", "lora.target_modules"}
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=makespan.STUDY_SEED))
    drawn: list[str] = []
    streak = 0
    while len(drawn) < workload.trials and streak < MAX_DUPLICATE_PROPOSALS:
        key = json.dumps(study.ask(space).params, sort_keys=True)
        streak = streak + 1 if key in drawn else 0
        drawn += [] if key in drawn else [key]
    assert len(drawn) == 16


def test_the_packed_study_prunes_at_evaluations_on_its_rungs(tmp_path):
    sequential, packed = makespan.sides_of(MAKESPAN_WORKLOADS["w3b-4bit-study16"])
    common = ["train.eval_strategy=no"]
    argv = makespan.sweep_command(MAKESPAN_WORKLOADS["w3b-4bit-study16"], packed, common, tmp_path)
    assert argv.index("train.eval_strategy=steps") > argv.index("train.eval_strategy=no")  # the side's wins
    assert {"hydra/sweeper/pruner=successive_halving", "hydra.sweeper.pruner.min_resource=32"} <= set(argv)
    assert {"train.eval_steps=32", "hydra.sweeper.pack=4"} <= set(argv)
    argv = makespan.sweep_command(MAKESPAN_WORKLOADS["w3b-4bit-study16"], sequential, common, tmp_path)
    assert {"hydra/sweeper/pruner=nop", "hydra.sweeper.pack=1"} <= set(argv) and "train.eval_strategy=steps" not in argv


def _run(tmp_path, workload: str) -> dict:
    out = tmp_path / f"{workload}.json"
    args = ["--workload", workload, "--device", "cpu", "--examples", "16", "--model-dir", str(tmp_path / "m")]
    assert makespan.makespan_main([*args, "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    sequential, packed = result["sides"]["sequential"], result["sides"]["packed"]
    assert result["speedup"] == pytest.approx(sequential["wall_s"] / packed["wall_s"])
    assert (sequential["pack"], packed["pack"]) == (1, 2)
    assert sequential["returncode"] == packed["returncode"] == 0
    assert f"tracking.experiment={workload}-packed" in shlex.split(packed["command"])
    return result


@pytest.mark.slow  # 1.5-3 min on a 2-core CPU: 4 sweeps as processes, each a forkserver and 4 tiny trainings
def test_both_tiny_makespan_workloads_run_their_sweeps_on_cpu(tmp_path):
    grid = _run(tmp_path, "tiny-grid4")
    for side in grid["sides"].values():
        assert side["finished"] == len(side["runs"]) == 4
        assert all(isinstance(run["eval_loss"], float) for run in side["runs"])
    names = [sorted(run["run_name"] for run in side["runs"]) for side in grid["sides"].values()]
    assert names[0] == names[1] and len(set(names[0])) == 4  # the same 4 jobs on both sides
    assert len(grid["eval_loss_rel_diff"]) == 4 and None not in grid["eval_loss_rel_diff"]  # paired by run name

    study = _run(tmp_path, "tiny-study4")
    sequential, packed = study["sides"]["sequential"], study["sides"]["packed"]
    assert sequential["states"] == {"COMPLETE": 4} and sequential["finished"] == 4
    assert sum(packed["states"].values()) == 4 and set(packed["states"]) <= {"COMPLETE", "PRUNED"}
    # Successive halving (factor 2) promotes a trial at a rung only if it is the best of the 2 to 4 there so far; the
    # seeded trials differ by far more than a pack's 1e-5, so some are pruned (which ones: which slot reports first)
    assert packed["states"].get("PRUNED", 0) >= 1 and packed["finished"] == packed["states"]["COMPLETE"]
    assert {run["status"] for run in packed["runs"]} == {"FINISHED", "KILLED"}  # a pruned trial's run: KILLED
    assert [t["params"] for t in sequential["trials"]] == [t["params"] for t in packed["trials"]]
    assert sequential["best"] == min(t["value"] for t in sequential["trials"])
    assert study["best_rel_diff"] == pytest.approx(abs(packed["best"] - sequential["best"]) / sequential["best"])
