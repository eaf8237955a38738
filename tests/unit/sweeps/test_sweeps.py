"""Sweeps: grids and Optuna studies as real subprocesses on the tiny model, and their pure parts."""

from __future__ import annotations

import os

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

from src.config import validate
from src.sweeps.configs import FeasibilityConf
from src.sweeps.feasibility import check_feasibility, fit_micro_batch
from src.sweeps.grid import grid_jobs
from src.sweeps.outcomes import JobSkipped
from src.sweeps.placement import assign_gpus, batch_size
from src.sweeps.record import SweepFailed
from src.sweeps.space import evaluate_derived, search_space, trial_overrides
from src.sweeps.study_trials import counted, recover_interrupted
from tests.conftest import OPENLLAMA_3B, ROOT, TINY, compose_config, compose_hydra

SWEEPS_DIR = ROOT / "sweeps"

# ---------------------------------------------------------------------------------------------
# Pure parts
# ---------------------------------------------------------------------------------------------


def test_parallel_jobs_get_one_gpu_each():
    assert assign_gpus(3, ["0", "1", "2", "3"]) == ["0", "1", "2"]
    assert assign_gpus(2, ["GPU-a", "GPU-b"]) == ["GPU-a", "GPU-b"]
    assert assign_gpus(2, []) == [None, None]  # CPU: nothing to pin
    with pytest.raises(ValueError, match="share a GPU"):
        assign_gpus(3, ["0", "1"])
    # Batches never hold more jobs than GPUs; the default is one job per GPU.
    assert batch_size(None, ["0", "1"]) == 2
    assert batch_size(8, ["0", "1", "2"]) == 3
    assert batch_size(4, []) == 4
    assert batch_size(None, []) == 1


def test_fit_micro_batch_halves_until_the_estimate_fits():
    def estimate(micro_batch: int) -> float:
        return 2.0 + 0.5 * micro_batch

    assert fit_micro_batch(8, 1, 10.0, estimate, shrink=True) == (8, 1)  # fits as is
    assert fit_micro_batch(16, 1, 7.0, estimate, shrink=True) == (8, 2)  # 10 GiB -> 6 GiB
    assert fit_micro_batch(16, 2, 4.0, estimate, shrink=True) == (4, 8)  # effective batch stays 32
    assert fit_micro_batch(3, 1, 3.0, estimate, shrink=True) == (1, 3)
    with pytest.raises(JobSkipped, match="micro-batch 1"):
        fit_micro_batch(16, 1, 2.2, estimate, shrink=True)
    with pytest.raises(JobSkipped, match="10.00 GiB"):
        fit_micro_batch(16, 1, 7.0, estimate, shrink=False)


def test_a_job_reads_isolate_and_feasibility_from_its_sweeper_or_the_schema():
    from omegaconf import OmegaConf

    from src.sweeps.configs import GridSweeperConf, JobConf, job_conf

    assert job_conf(OmegaConf.create({"max_batch_size": None})) == JobConf()  # Hydra's basic sweeper: the defaults
    assert job_conf(OmegaConf.structured(GridSweeperConf)) == JobConf()
    given = job_conf(OmegaConf.create({"isolate": False, "feasibility": {"mode": "skip", "available_gpu_mem_gb": 3}}))
    assert given == JobConf(isolate=False, feasibility=FeasibilityConf("skip", 3.0))


def test_feasibility_uses_src_plan_and_an_injected_free_memory():
    from dataclasses import replace

    from src.memory import plan

    # the padded path, whose batch the check shrinks (the packed one plans to a budget: the test below)
    raw = compose_config(
        ["train.fast_path=false", "train.per_device_train_batch_size=16", "train.gradient_accumulation_steps=1"]
    )
    cfg = validate(raw)
    est = {
        bs: plan(replace(cfg, train=replace(cfg.train, per_device_train_batch_size=bs))).est_peak_gpu_mem_gb
        for bs in (16, 8)
    }
    assert est[16] > est[8]
    shrunk, note = check_feasibility(cfg, FeasibilityConf("shrink", (est[16] + est[8]) / 2))
    assert (shrunk.train.per_device_train_batch_size, shrunk.train.gradient_accumulation_steps) == (8, 2)
    train = shrunk.resolved()["train"]  # what the run logs as params: changed as the config was
    assert (train["per_device_train_batch_size"], train["gradient_accumulation_steps"]) == (8, 2)
    assert shrunk == validate(shrunk.resolved())
    assert "micro-batch 16 -> 8" in note
    assert check_feasibility(cfg, FeasibilityConf("shrink", est[16] + 1)) == (cfg, None)
    assert check_feasibility(cfg, FeasibilityConf("off", 1e-9)) == (cfg, None)
    with pytest.raises(JobSkipped):
        check_feasibility(cfg, FeasibilityConf("skip", (est[16] + est[8]) / 2))
    # On CPU with nothing injected there is no GPU to compare with: the config runs as is.
    assert check_feasibility(cfg, FeasibilityConf("shrink", None)) == (cfg, None)


@pytest.mark.parametrize("data", ["instructions", "topics"])
def test_feasibility_hands_the_free_memory_to_the_fast_path_as_its_budget(data):
    """The packed paths (SFT, a decoder classifier) plan their own micro-batches from train.memory_budget_gb: that
    is what must shrink (a shrunk batch alone the packed classifier would plan back up to 90% of the card)."""
    raw = compose_config([f"data={data}", "train.per_device_train_batch_size=16"])
    budgeted, note = check_feasibility(validate(raw), FeasibilityConf("shrink", 7.5))
    assert budgeted.train.memory_budget_gb == 7.5 and budgeted.train.per_device_train_batch_size == 16
    assert budgeted.resolved()["train"]["memory_budget_gb"] == 7.5
    assert "train.memory_budget_gb None -> 7.50" in note
    with pytest.raises(JobSkipped, match="at micro-batch 1 with every layer checkpointed"):  # nothing fits
        check_feasibility(validate(raw), FeasibilityConf("shrink", 0.001))
    within = validate(compose_config([f"data={data}", "train.memory_budget_gb=4"]))
    assert check_feasibility(within, FeasibilityConf("shrink", 7.5)) == (within, None)


def test_search_space_reads_hydra_override_grammar():
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    params = {
        "lora.r": "choice(4, 8, 16)",
        "train.learning_rate": "tag(log, interval(1e-5, 1e-3))",
        "lora.dropout": "interval(0.0, 0.1)",
        "train.seed": "7",
    }
    space, fixed = search_space(
        parser,
        params,
        ["lora=attn_qv,all_linear", "train.max_steps=range(10,31,10)", "lora.r=choice(2,4)", "data.subsample=32"],
    )
    assert space["lora.r"] == CategoricalDistribution([2, 4])  # the command line wins over params
    assert space["lora"] == CategoricalDistribution(["attn_qv", "all_linear"])
    assert space["train.learning_rate"] == FloatDistribution(1e-5, 1e-3, log=True)
    assert space["lora.dropout"] == FloatDistribution(0.0, 0.1)
    assert space["train.max_steps"] == IntDistribution(10, 30, step=10)
    assert sorted(fixed) == ["data.subsample=32", "train.seed=7"]


def test_alpha_as_a_ratio_of_r_is_derived():
    params = {"lora.r": 16, "lora.alpha_ratio": 0.5, "lora": "all_linear", "train.learning_rate": 1e-4}
    assert evaluate_derived("lora.alpha_ratio * lora.r", params) == 8
    assert evaluate_derived("2 * lora.r", params) == 32
    assert trial_overrides(params, {"lora.alpha_ratio"}, {"lora.alpha": "lora.alpha_ratio * lora.r"}) == [
        "lora.r=16",
        "lora=all_linear",
        "train.learning_rate=0.0001",
        "lora.alpha=8",
    ]
    with pytest.raises(SweepFailed, match="neither a param nor a number"):
        evaluate_derived("lora.ratio * lora.r", params)


def test_grid_rows_multiply_with_command_line_sweeps():
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    rows = ["lora=attn_qv lora.r=8", "lora=all_linear lora.target_modules=[all_linear,lm_head] lora.r=8"]
    jobs = grid_jobs(parser, ["train.seed=1,2", "data.subsample=32"], rows)
    assert jobs == [
        ["train.seed=1", "data.subsample=32", "lora=attn_qv", "lora.r=8"],
        [
            "train.seed=1",
            "data.subsample=32",
            "lora=all_linear",
            "lora.target_modules=[all_linear,lm_head]",
            "lora.r=8",
        ],
        ["train.seed=2", "data.subsample=32", "lora=attn_qv", "lora.r=8"],
        [
            "train.seed=2",
            "data.subsample=32",
            "lora=all_linear",
            "lora.target_modules=[all_linear,lm_head]",
            "lora.r=8",
        ],
    ]
    assert grid_jobs(parser, ["lora.r=8,16", "lora=attn_qv,mlp"], None) == [
        ["lora.r=8", "lora=attn_qv"],
        ["lora.r=8", "lora=mlp"],
        ["lora.r=16", "lora=attn_qv"],
        ["lora.r=16", "lora=mlp"],
    ]
    with pytest.raises(SweepFailed, match="command line sets too"):
        grid_jobs(parser, ["lora.r=4"], rows)


def test_interrupted_trials_are_failed_and_retried_once(tmp_path):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(study_name="s", storage=storage, direction="maximize")
    space = {"lora.r": CategoricalDistribution([4, 8, 16])}
    done = study.ask(space)
    study.tell(done, 0.5)
    dead = study.ask(space)  # left RUNNING by a sweep process that no longer exists
    dead.set_user_attr("sweeper_host", os.uname().nodename)
    dead.set_user_attr("sweeper_pid", 2**22 + 12345)
    alive = study.ask(space)  # still run by this (live) process
    alive.set_user_attr("sweeper_host", os.uname().nodename)
    alive.set_user_attr("sweeper_pid", os.getpid())
    failed = study.ask(space)
    failed.set_user_attr("fail_reason", "ConfigError: ...")
    study.tell(failed, state=TrialState.FAIL)

    assert recover_interrupted(study) == [dead.number]
    trials = {t.number: t for t in study.get_trials()}
    assert trials[dead.number].state == TrialState.FAIL and not counted(trials[dead.number])
    assert trials[alive.number].state == TrialState.RUNNING
    assert counted(trials[done.number]) and counted(trials[failed.number])
    assert [t.user_attrs["retry_of"] for t in study.get_trials(states=(TrialState.WAITING,))] == [dead.number]
    assert recover_interrupted(study) == []  # enqueued once only
    assert study.ask(space).params == dead.params  # the next trial is the retry, with the same params


def test_a_trial_whose_sweeper_pid_was_reused_is_failed_and_retried(tmp_path):
    """Ownership is host + pid + process start: a live process that took a dead sweeper's pid does not keep the
    trial RUNNING for good. A pid recorded in another pid namespace (another container) is not judged here."""
    from src import tracking
    from src.sweeps.study_trials import set_owner

    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(study_name="s", storage=storage, direction="maximize")
    space = {"lora.r": CategoricalDistribution([4, 8, 16, 32])}
    own = tracking.process_start(os.getpid())
    namespace = own.split("@")[0]
    host = os.uname().nodename
    trials = {}
    for name, pid, start in [
        ("reused-by-this-process", os.getpid(), f"{namespace}@1"),
        ("reused-by-init", 1, f"{namespace}@999999999"),
        ("other-container", 2**22 + 12345, "pid:[1]@5"),
    ]:
        trials[name] = study.ask(space)
        for key, value in (("sweeper_host", host), ("sweeper_pid", pid), ("sweeper_start", start)):
            trials[name].set_user_attr(key, value)
    trials["live"] = study.ask(space)
    set_owner(trials["live"])
    assert trials["live"].user_attrs["sweeper_start"] == own

    retried = recover_interrupted(study)
    assert retried == sorted(trials[n].number for n in ("reused-by-this-process", "reused-by-init"))
    states = {t.number: t.state for t in study.get_trials()}
    assert states[trials["other-container"].number] == TrialState.RUNNING
    assert states[trials["live"].number] == TrialState.RUNNING


def test_a_trial_whose_run_finished_after_its_sweep_died_is_adopted_not_retrained(tmp_path):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(study_name="s", storage=storage, direction="maximize")
    space = {"lora.r": CategoricalDistribution([4, 8, 16])}
    ended = study.ask(space)  # its sweep was killed, but its MLflow run had FINISHED with 0.75
    ended.set_user_attr("sweeper_host", os.uname().nodename)
    ended.set_user_attr("sweeper_pid", 2**22 + 12345)
    assert recover_interrupted(study, {ended.number: [0.75]}) == []  # nothing to train again
    (trial,) = study.get_trials()
    assert trial.state == TrialState.COMPLETE and trial.value == 0.75 and "adopted" in trial.user_attrs
    assert counted(trial)


@pytest.mark.parametrize("path", sorted(SWEEPS_DIR.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_sweep_file_composes_and_validates(path):
    first = path.read_text().splitlines()[0]
    assert first == f"# python -m src.train -cd sweeps -cn {path.stem}"
    from omegaconf import OmegaConf

    cfg = compose_hydra(SWEEPS_DIR, path.stem)
    assert str(cfg.hydra.mode) == "RunMode.MULTIRUN"
    assert cfg.model.name == "openllama3b"  # real targets by default
    assert cfg.hydra.sweeper._target_.startswith("hydra_plugins.lora_sweeps.sweepers.")
    validate(compose_config([], config_dir=SWEEPS_DIR, config_name=path.stem))
    validate(compose_config(TINY, config_dir=SWEEPS_DIR, config_name=path.stem))
    sweeper = OmegaConf.to_container(cfg.hydra.sweeper, resolve=True)
    if sweeper.get("sampler"):  # Optuna: the sampler, pruner and search space build
        from hydra.core.override_parser.overrides_parser import OverridesParser

        from src.sweeps.study import build_sampler
        from src.trial import build_pruner, pruner_spec

        assert isinstance(build_sampler(sweeper["sampler"]), optuna.samplers.BaseSampler)
        assert isinstance(build_pruner(pruner_spec(sweeper["pruner"])), optuna.pruners.BasePruner)
        space, _ = search_space(OverridesParser.create(), sweeper["params"], [])
        assert space and all(isinstance(d, optuna.distributions.BaseDistribution) for d in space.values())
    else:
        assert sweeper["rows"]


def test_seed_table_counts_on_a_config_only_openllama3b(random_checkpoint):
    """The four rows of seed_table give the seed's trainable counts, through src.plan (no weights)."""

    from src.memory import plan

    openllama = random_checkpoint("llama", **OPENLLAMA_3B)
    rows = list(compose_hydra(SWEEPS_DIR, "seed_table").hydra.sweeper.rows)
    counts = []
    for row in rows:
        raw = compose_config([*row.split(), f"model.name_or_path={openllama}"], SWEEPS_DIR, "seed_table")
        result = plan(validate(raw))
        counts.append((result.quant_bits, result.trainable_params))
    assert counts == [(4, 2_662_400), (4, 5_324_800), (4, 12_994_560), (8, 12_994_560)]


# ---------------------------------------------------------------------------------------------
# Real sweeps (subprocesses, tiny model)
# ---------------------------------------------------------------------------------------------


def test_config_changes_name_every_key_that_differs():
    from src.config import config_changes

    stored = {"train.max_steps": 400, "data.path": "a.csv", "lora.dropout": 0.1}
    current = {"train.max_steps": 5, "data.path": "a.csv", "data.subsample": 32}
    assert config_changes(stored, current) == [
        'data.subsample: "(unset)" vs 32',
        'lora.dropout: 0.1 vs "(unset)"',
        "train.max_steps: 400 vs 5",
    ]
    assert config_changes(stored, dict(stored)) == []


def test_swept_keys_are_what_varies_between_jobs_or_the_studys_space():
    from src.sweeps.record import swept_keys

    jobs = ["model=tiny lora.r=4 quant=4bit train.max_steps=2", "model=tiny lora.r=8 quant=8bit train.max_steps=2"]
    assert swept_keys({"jobs": jobs}) == ["lora.r"]  # quant is a group: its columns are fixed (quant.bits)
    space = {"lora": "choice", "lora.r": "choice", "lora.alpha_ratio": "choice", "train.learning_rate": "log"}
    assert swept_keys({"space": space}) == ["lora.r", "lora.alpha_ratio", "train.learning_rate"]


def test_sweeper_settings_outside_their_domain_are_refused_all_at_once():
    from src.sweeps.grid import GridSweeper
    from src.sweeps.study import OptunaSweeper

    with pytest.raises(SweepFailed) as info:
        OptunaSweeper(
            sampler=None,
            pruner=None,
            n_trials=0,
            n_jobs=-1,
            max_failure_rate=float("nan"),
            heartbeat_interval=0,
            feasibility={"mode": "shrink", "available_gpu_mem_gb": float("inf")},
            pack=0,
        )
    text = str(info.value)
    for problem in (
        "hydra.sweeper.n_trials: must be >= 1, got 0",
        "hydra.sweeper.n_jobs: must be >= 1, got -1",
        "hydra.sweeper.max_failure_rate: must be finite, got nan",
        "hydra.sweeper.heartbeat_interval: must be >= 1, got 0",
        "hydra.sweeper.feasibility.available_gpu_mem_gb: must be finite, got inf",
        "hydra.sweeper.pack: must be >= 1, got 0",
    ):
        assert problem in text, (problem, text)
    with pytest.raises(
        SweepFailed, match=r"max_batch_size: must be >= 1, got 0.*max_failure_rate: must be in \[0, 1\]"
    ):
        GridSweeper(max_batch_size=0, max_failure_rate=1.5)
    OptunaSweeper(sampler=None, pruner=None, n_trials=1, n_jobs=1)  # the smallest sensible study
    GridSweeper(max_failure_rate=0.0)


GRID_WITH_TYPOS = """\
defaults:
  - config
  - _self_
hydra:
  searchpath:
    - file://${project_root:}/conf
  mode: MULTIRUN
  sweeper:
    rows:
      - lora=attn_qv lora.r=8
      - lora=al_linear lora.rnak=8
    params:
      quant: 4bit,8bits
"""
STUDY_WITH_TYPOS = """\
defaults:
  - config
  - override hydra/sweeper: lora_optuna
  - _self_
hydra:
  searchpath:
    - file://${project_root:}/conf
  mode: MULTIRUN
  sweeper:
    params:
      lora.dropuot: interval(0.0, 0.1)
      lora: choice(attn, al_linear)
      lora.alpha_ratio: choice(1, 2)
    derived:
      lora.alpah: lora.alpha_ratio * lora.r
"""
LORA_OPTIONS = "(options: all_but_head, all_linear, attn, attn_qv, mlp, none)"


@pytest.mark.parametrize(
    ("sweep", "expected"),
    [
        (
            GRID_WITH_TYPOS,
            [
                f"hydra.sweeper.rows[1]: lora=al_linear: no such lora option; did you mean all_linear? {LORA_OPTIONS}",
                "hydra.sweeper.rows[1]: lora.rnak: unknown key; did you mean lora.r?",
                "hydra.sweeper.params: quant=8bits: no such quant option; did you mean 8bit? "
                "(options: 4bit, 8bit, fp8, none)",
            ],
        ),
        (
            STUDY_WITH_TYPOS,
            [
                "hydra.sweeper.params: lora.dropuot: unknown key; did you mean lora.dropout?",
                f"hydra.sweeper.params: lora=al_linear: no such lora option; did you mean all_linear? {LORA_OPTIONS}",
                "hydra.sweeper.derived: lora.alpah: unknown key; did you mean lora.alpha?",
            ],
        ),
    ],
)
def test_a_sweep_configs_mistyped_keys_and_options_are_named_before_it_starts(tmp_path, sweep, expected):
    """Hydra would fail each job with "To append to your config use +lora.rnak=8"."""
    from src.sweeps.configs import SweepRefused, vet

    (tmp_path / "typos.yaml").write_text(sweep)
    with pytest.raises(SweepRefused) as info:
        vet(compose_hydra(tmp_path, "typos"))
    assert str(info.value).splitlines() == ["invalid config:", *(f"  - {line}" for line in expected)]


@pytest.mark.parametrize("name", ["seed_table", "rank_alpha", "pareto", "lr_rank"])
def test_the_shipped_sweeps_keys_and_options_all_exist(name):
    from src.sweeps.configs import sweep_key_problems

    assert sweep_key_problems(compose_hydra(SWEEPS_DIR, name)) == []


def test_the_pareto_summary_names_each_metric_and_the_trials_params():
    """`#0 (6.5939, 28672.0)` said neither which metric nor which trial: each value now sits under its metric's name,
    with the trial's params; one objective is named too."""
    from src.sweeps.study_report import best_text

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(directions=["minimize", "minimize"])
    for values in [(6.5939, 28672.0), (6.1, 57344.0), (7.0, 99999.0)]:  # the last is dominated by the first
        trial = study.ask({"lora.r": IntDistribution(4, 16), "train.learning_rate": FloatDistribution(1e-4, 1e-2)})
        study.tell(trial, values)
    text, _ = best_text(study, ["eval_loss", "trainable_params"])
    assert text.startswith("Pareto front of 2 trial(s): ")
    assert f"#0 eval_loss=6.594 trainable_params=2.867e+04 (lora.r={study.trials[0].params['lora.r']}" in text
    assert "train.learning_rate=" in text and "#2" not in text

    single = optuna.create_study(direction="maximize")
    trial = single.ask({"lora.r": IntDistribution(4, 16)})
    single.tell(trial, 0.91)
    text, value = best_text(single, ["eval_f1_macro"])
    assert text == f"eval_f1_macro=0.91 (#0 lora.r={trial.params['lora.r']})" and value == 0.91


def test_named_keys_tell_a_sweeps_runs_apart():
    """What each job's run name adds (src.tracking.run_name): the config keys a grid varies (group choices show in
    the base name), or a study's searched and derived keys that are config keys; nothing for a one-job grid."""
    from src.sweeps.record import named_keys

    config = compose_hydra()
    jobs = ["model=tiny data.class_weights=none lora.r=4", "model=tiny data.class_weights=balanced lora.r=8"]
    assert named_keys({"jobs": jobs}, config) == ["data.class_weights", "lora.r"]
    assert named_keys({"jobs": jobs[:1]}, config) == []
    space = {"lora.r": "choice", "lora.alpha_ratio": "choice", "train.learning_rate": "log", "quant": "choice"}
    assert named_keys({"space": space, "derived": {"lora.alpha": "lora.alpha_ratio * lora.r"}}, config) == [
        "lora.r",
        "train.learning_rate",
        "lora.alpha",
    ]


def test_a_job_result_reads_back_as_written_and_raises_as_its_status_says():
    import optuna

    from src.sweeps.outcomes import JobFailed, JobResult, Status

    ok = JobResult(Status.OK, "r1", {"objective": 0.5})
    assert ok.to_json() == {"status": "ok", "run_id": "r1", "metrics": {"objective": 0.5}}  # job_result.json
    assert JobResult.from_json(ok.to_json()) == ok and ok.raise_unless_ok() == {"run_id": "r1", "metrics": ok.metrics}
    failed = JobResult.of_exception(JobFailed("OutOfMemoryError", "CUDA out of memory", "r2"))
    assert failed.to_json() == {
        "status": "failed",
        "run_id": "r2",
        "error_type": "OutOfMemoryError",
        "message": "CUDA out of memory",
    }
    assert failed.reason == "OutOfMemoryError: CUDA out of memory" and failed.status.label == "FAILED"
    with pytest.raises(JobFailed, match="OutOfMemoryError: CUDA out of memory") as info:
        JobResult.from_json(failed.to_json()).raise_unless_ok()
    assert info.value.run_id == "r2"
    pruned = JobResult.of_exception(optuna.TrialPruned("pruned at step 4"))
    with pytest.raises(optuna.TrialPruned, match="step 4"):
        JobResult.from_json(pruned.to_json()).raise_unless_ok()
    skipped = JobResult.from_json({"status": "skipped", "message": "needs ~9 GiB"})
    assert skipped.reason == "needs ~9 GiB" and skipped.status.label == "SKIPPED" and Status.OK.label == "FINISHED"
    with pytest.raises(JobSkipped, match="needs ~9 GiB"):
        skipped.raise_unless_ok()
    assert JobResult.from_json({}).status is Status.FAILED  # a pack's trial that never reported


def test_a_sweeper_takes_every_default_from_its_config_dataclass():
    from src.sweeps.configs import GridSweeperConf, OptunaSweeperConf
    from src.sweeps.grid import GridSweeper
    from src.sweeps.study import OptunaSweeper

    study = OptunaSweeper(sampler=None, pruner=None)
    assert study.conf == OptunaSweeperConf(sampler=None, pruner=None) and study.metrics == ["objective"]
    assert GridSweeper().conf == GridSweeperConf()


def test_every_sweeper_setting_has_help():
    import dataclasses

    from src.sweeps.configs import FeasibilityConf, GridSweeperConf, OptunaSweeperConf

    hydra_keys = {"_target_", "_recursive_", "defaults"}
    without = [
        f"{conf.__name__}.{f.name}"
        for conf in (FeasibilityConf, GridSweeperConf, OptunaSweeperConf)
        for f in dataclasses.fields(conf)
        if f.name not in hydra_keys and not str(f.metadata.get("help", "")).strip()
    ]
    assert without == []
