"""src.compare: the pure pieces on hand-checked data, and the command on runs made through MLflow's API."""

from __future__ import annotations

import json
import math
import re
import shutil

import pytest

from src.runs import compare
from src.runs.compare import Column, format_table, group_seeds, pareto_front, pick_best

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# --- pure pieces ---------------------------------------------------------------------------------


def test_pareto_front_on_a_hand_checked_set():
    # (quality, trainable params): maximize quality, minimize params.
    points = [
        (0.90, 8.0),  # 0: best quality                                     -> front
        (0.85, 2.0),  # 1: better than 2 on both                            -> front
        (0.80, 4.0),  # 2: dominated by 1 (0.85 >= 0.80 and 2 <= 4)
        (0.70, 1.0),  # 3: fewest params                                    -> front
        (0.70, 1.0),  # 4: equal to 3; equal points do not dominate         -> front
        (0.90, 9.0),  # 5: dominated by 0 (same quality, more params)
        (0.60, 0.5),  # 6: fewest params of all                             -> front
        (None, 0.1),  # 7: no quality: never on the front
        (float("nan"), 0.1),  # 8: NaN quality: never on the front
    ]
    assert pareto_front(points, ("max", "min")) == [True, True, False, True, True, False, True, False, False]
    # Flipping the quality direction (a loss, say) gives another front: low value and few params.
    assert pareto_front(points, ("min", "min")) == [False, False, False, False, False, False, True, False, False]
    # Both maximized: 0 wins the quality, 5 the "params", and 5 dominates 0 only if >= on both.
    assert pareto_front(points, ("max", "max")) == [False, False, False, False, False, True, False, False, False]


def test_pick_best_respects_direction_and_breaks_ties_by_fewer_params():
    rows = [
        {"q": 0.8, "trainable_params_m": 4.0},
        {"q": 0.9, "trainable_params_m": 8.0},
        {"q": 0.9, "trainable_params_m": 2.0},  # ties with row 1, fewer params
        {"q": None, "trainable_params_m": 0.1},
        {"q": float("nan"), "trainable_params_m": 0.1},
    ]
    assert pick_best(rows, "q", "max") == 2
    assert pick_best(rows, "q", "min") == 0
    assert pick_best([{"q": None}], "q", "max") is None


def _row(name, seed, value, status="FINISHED", config="a"):
    return {
        "run": name,
        "run_ids": [f"id-{name}-{seed}"],
        "seeds": [seed],
        "q": value,
        "status": status,
        "config_key": config,
    }


def test_group_seeds_means_and_sample_std_of_finished_runs_only():
    rows = [
        _row("a", 1, 0.6),
        _row("b", 1, 0.5, config="b"),
        _row("a", 2, 0.8),
        _row("a", 3, None),
        _row("a", 4, 0.1, status="FAILED"),
    ]
    grouped = group_seeds(rows, ["q"])
    assert [r["run"] for r in grouped] == ["a", "b", "a"]
    a, b, failed = grouped
    assert a["run_ids"] == ["id-a-1", "id-a-2", "id-a-3"] and a["seeds"] == [1, 2, 3]
    assert a["q"] == pytest.approx(0.7)  # the run without a value is left out of the mean
    assert a["std"]["q"] == pytest.approx(math.sqrt(((0.6 - 0.7) ** 2 + (0.8 - 0.7) ** 2) / 1))
    assert b is rows[1] and "std" not in b
    assert failed["status"] == "FAILED" and failed["q"] == 0.1  # never averaged in


def test_format_table_md_csv_json_html():
    columns = [Column("run", "run"), Column("q", "quality", ".3f", "max"), Column("status", "status")]
    rows = [
        {
            "run": "x|y",
            "run_ids": ["r1", "r2"],
            "seeds": [1, 2],
            "q": 0.5,
            "std": {"q": 0.25},
            "status": "FINISHED",
            "best": True,
            "pareto": True,
        },
        {"run": "z", "run_ids": ["r3"], "seeds": [1], "q": None, "status": "FAILED", "best": False, "pareto": False},
    ]
    assert format_table(rows, columns, "md") == (
        "| mark       | run  |       quality | status   |\n"
        "| ---------- | ---- | ------------: | -------- |\n"
        "| best front | x\\|y | 0.500 ± 0.250 | FINISHED |\n"
        "|            | z    |             - | FAILED   |"
    )
    assert format_table(rows, columns, "csv") == (
        "mark,run_id,run,q,q_std,status\nbest front,r1;r2,x|y,0.5,0.25,FINISHED\n,r3,z,,,FAILED"
    )
    assert json.loads(format_table(rows, columns, "json")) == {
        "columns": [
            {"key": "run", "header": "run", "direction": None},
            {"key": "q", "header": "quality", "direction": "max"},
            {"key": "status", "header": "status", "direction": None},
        ],
        "rows": [
            {
                "best": True,
                "pareto": True,
                "run_ids": ["r1", "r2"],
                "run": "x|y",
                "q": 0.5,
                "status": "FINISHED",
                "std": {"q": 0.25},
            },
            {"best": False, "pareto": False, "run_ids": ["r3"], "run": "z", "q": None, "status": "FAILED", "std": {}},
        ],
    }
    page = format_table(rows, columns, "html")
    assert '<tr class="best"><td>best front</td><td>x|y</td><td style="text-align:right">0.500 ± 0.250</td>' in page
    assert page.startswith('<table class="compare">') and page.endswith("</table>")


# --- the command on a real MLflow store ------------------------------------------------------------

CHILD_PARAMS = {
    "model.name": "tiny",
    "data.name": "topics",
    "data.task": "classification",
    "quant.bits": "16",
    "lora.target_modules": "null",
    "objective.metric": "null",
    "objective.direction": "null",
    "lora.dropout": "0.05",
}
# name -> (start, params, final metrics, status). Runs A and B repeat one config with seeds 1 and 2.
CHILDREN = {
    "A": (
        2100,
        {
            "lora.preset": "attn_qv",
            "lora.resolved_targets": "q_proj,v_proj",
            "lora.r": "8",
            "lora.alpha": "16",
            "train.seed": "1",
        },
        {
            "objective": 0.625,
            "eval_accuracy": 0.5,
            "trainable_params": 4096,
            "trainable_pct": 0.5,
            "train_tokens_per_s": 1000.0,
            "train_runtime_s": 10.0,
            "peak_gpu_mem_gb": 2.0,
        },
        "FINISHED",
    ),
    "B": (
        2200,
        {
            "lora.preset": "attn_qv",
            "lora.resolved_targets": "q_proj,v_proj",
            "lora.r": "8",
            "lora.alpha": "16",
            "train.seed": "2",
        },
        {
            "objective": 0.875,
            "eval_accuracy": 1.0,
            "trainable_params": 4096,
            "trainable_pct": 0.5,
            "train_tokens_per_s": 1200.0,
            "train_runtime_s": 12.0,
            "peak_gpu_mem_gb": 2.0,
        },
        "FINISHED",
    ),
    "C": (
        2300,
        {
            "lora.preset": "all_linear",
            "lora.resolved_targets": "q_proj,k_proj,v_proj,o_proj",
            "lora.r": "16",
            "lora.alpha": "32",
            "train.seed": "1",
        },
        {
            "objective": 0.75,
            "eval_accuracy": 0.8,
            "trainable_params": 32768,
            "trainable_pct": 4.0,
            "train_tokens_per_s": 800.0,
            "train_runtime_s": 20.0,
            "peak_gpu_mem_gb": 3.0,
        },
        "FINISHED",
    ),
    "D": (
        2400,
        {
            "lora.preset": "attn_qv",
            "lora.target_modules": "['k_proj', 'o_proj']",
            "lora.r": "4",
            "lora.alpha": "8",
            "train.seed": "1",
        },
        {
            "objective": 0.6,
            "eval_accuracy": 0.7,
            "trainable_params": 2048,
            "trainable_pct": 0.25,
            "train_tokens_per_s": 1500.0,
            "train_runtime_s": 8.0,
            "peak_gpu_mem_gb": 1.5,
        },
        "FINISHED",
    ),
    "E": (2500, {"lora.preset": "mlp", "lora.r": "8", "lora.alpha": "16", "train.seed": "1"}, {}, "FAILED"),
}
RUN_NAMES = {
    "A": "tiny-16bit-attn_qv-r8-a16",
    "B": "tiny-16bit-attn_qv-r8-a16",
    "C": "tiny-16bit-all_linear-r16-a32",
    "D": "tiny-16bit-k_proj+o_proj-r4-a8",
    "E": "tiny-16bit-mlp-r8-a16",
}


def _make_run(client, experiment_id, name, start, params, metrics, status, tags):
    from mlflow.entities import Metric, Param

    run = client.create_run(experiment_id, start_time=start, tags=tags, run_name=name)
    run_id = run.info.run_id
    client.log_batch(run_id, params=[Param(k, v) for k, v in params.items()])
    final = [Metric(k, v, start + 50, 0) for k, v in metrics.items()]
    curves = []
    if "objective" in metrics:  # history: train_loss per step, eval_f1_macro per evaluation ending at the objective
        curves = [Metric("train_loss", 2.0 / step, start + step, step) for step in (1, 2, 3)]
        curves += [
            Metric("eval_f1_macro", metrics["objective"] / 2, start + 2, 2),
            Metric("eval_f1_macro", metrics["objective"], start + 3, 3),
        ]
    if final or curves:
        client.log_batch(run_id, metrics=final + curves)
    if status == "FAILED":
        client.set_tag(run_id, "error_type", "RuntimeError")
    client.set_terminated(run_id, status, end_time=start + 60)
    return run_id


@pytest.fixture(scope="module")
def sweep_store_template(tmp_path_factory):
    """An older one-run sweep, then sweep 's2': a parent and the five children above; built once per module."""
    import mlflow

    root = tmp_path_factory.mktemp("sweep_store")
    client = mlflow.MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    client.create_experiment("empty", artifact_location=(root / "empty").as_uri())
    experiment_id = client.create_experiment("cmp", artifact_location=(root / "artifacts").as_uri())
    old_parent = _make_run(client, experiment_id, "sweep-old", 1000, {}, {}, "FINISHED", {"sweep_id": "s1"})
    _make_run(
        client,
        experiment_id,
        "old-child",
        1100,
        {**CHILD_PARAMS, **CHILDREN["C"][1]},
        {"objective": 0.1},
        "FINISHED",
        {"sweep_id": "s1", "mlflow.parentRunId": old_parent},
    )
    parent = _make_run(client, experiment_id, "sweep-s2", 2000, {}, {}, "FINISHED", {"sweep_id": "s2"})
    ids = {}
    for key, (start, params, metrics, status) in CHILDREN.items():
        ids[key] = _make_run(
            client,
            experiment_id,
            RUN_NAMES[key],
            start,
            {**CHILD_PARAMS, **params, "output_dir": f"/tmp/out/{key}"},
            metrics,
            status,
            {"sweep_id": "s2", "mlflow.parentRunId": parent},
        )
    return {"db": root / "mlflow.db", "experiment_id": experiment_id, "parent": parent, "ids": ids}


@pytest.fixture
def sweep_store(sweep_store_template, tmp_path, monkeypatch):
    """A copy of the template store, selected through MLFLOW_TRACKING_URI (copying skips MLflow's set-up)."""
    import mlflow

    db = tmp_path / "mlflow.db"
    shutil.copyfile(sweep_store_template["db"], db)
    uri = f"sqlite:///{db}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    return {**sweep_store_template, "client": mlflow.MlflowClient(uri)}


def _run(capsys, *argv):
    code = compare.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


EXPECTED_MD = """\
| mark       | run                            | run id            | model | data   | task           | base bits | target modules              |   r | alpha | seeds |   eval_f1_macro |   eval_accuracy | trainable params (M) | trainable % | peak GPU mem (GB) |       tokens/s | runtime (s) | status   |
| ---------- | ------------------------------ | ----------------- | ----- | ------ | -------------- | --------: | --------------------------- | --: | ----: | ----- | --------------: | --------------: | -------------------: | ----------: | ----------------: | -------------: | ----------: | -------- |
| best front | tiny-16bit-attn_qv-r8-a16      | AAAAAAAA,BBBBBBBB | tiny  | topics | classification |        16 | q_proj,v_proj               |   8 |    16 | 1,2   | 0.7500 ± 0.1768 | 0.7500 ± 0.3536 |             0.004096 |         0.5 |              2.00 | 1100.0 ± 141.4 |  11.0 ± 1.4 | FINISHED |
|            | tiny-16bit-all_linear-r16-a32  | CCCCCCCC          | tiny  | topics | classification |        16 | q_proj,k_proj,v_proj,o_proj |  16 |    32 | 1     |          0.7500 |          0.8000 |              0.03277 |           4 |              3.00 |          800.0 |        20.0 | FINISHED |
| front      | tiny-16bit-k_proj+o_proj-r4-a8 | DDDDDDDD          | tiny  | topics | classification |        16 | k_proj,o_proj               |   4 |     8 | 1     |          0.6000 |          0.7000 |             0.002048 |        0.25 |              1.50 |         1500.0 |         8.0 | FINISHED |
|            | tiny-16bit-mlp-r8-a16          | EEEEEEEE          | tiny  | topics | classification |        16 | mlp                         |   8 |    16 | 1     |               - |               - |                    - |           - |                 - |              - |           - | FAILED   |
"""  # noqa: E501


def test_compare_md_table_of_newest_sweep(sweep_store, capsys):
    code, out, err = _run(capsys, "--metric", "eval_accuracy", "--pareto", "quality,params")
    assert code == 0, err
    assert err.strip() == "sweep 's2': 5 run(s) in 4 row(s); objective eval_f1_macro (max)"
    lines = out.rstrip("\n").split("\n")
    cells = [[c.strip() for c in line.strip("|").split(" | ")] for line in lines]
    assert cells[0] == [
        "mark",
        "run",
        "run id",
        "model",
        "data",
        "task",
        "base bits",
        "target modules",
        "r",
        "alpha",
        "seeds",
        "eval_f1_macro",
        "eval_accuracy",
        "trainable params (M)",
        "trainable %",
        "peak GPU mem (GB)",
        "tokens/s",
        "runtime (s)",
        "status",
    ]
    # A and B (seeds 1, 2) are one row: mean ± sample std. It ties C on quality (0.75) and wins on fewer params.
    ids = {key: run_id[:8] for key, run_id in sweep_store["ids"].items()}
    fixed = ["tiny", "topics", "classification", "16"]
    assert cells[2:] == [
        [
            "best front",
            "tiny-16bit-attn_qv-r8-a16",
            f"{ids['A']},{ids['B']}",
            *fixed,
            "q_proj,v_proj",
            "8",
            "16",
            "1,2",
            "0.7500 ± 0.1768",
            "0.7500 ± 0.3536",
            "0.004096",
            "0.5",
            "2.00",
            "1100.0 ± 141.4",
            "11.0 ± 1.4",
            "FINISHED",
        ],
        [
            "",
            "tiny-16bit-all_linear-r16-a32",
            ids["C"],
            *fixed,
            "q_proj,k_proj,v_proj,o_proj",
            "16",
            "32",
            "1",
            "0.7500",
            "0.8000",
            "0.03277",
            "4",
            "3.00",
            "800.0",
            "20.0",
            "FINISHED",
        ],
        [
            "front",
            "tiny-16bit-k_proj+o_proj-r4-a8",
            ids["D"],
            *fixed,
            "k_proj,o_proj",
            "4",
            "8",
            "1",
            "0.6000",
            "0.7000",
            "0.002048",
            "0.25",
            "1.50",
            "1500.0",
            "8.0",
            "FINISHED",
        ],
        [
            "",
            "tiny-16bit-mlp-r8-a16",
            ids["E"],
            *fixed,
            "mlp",
            "8",
            "16",
            "1",
            "-",
            "-",
            "-",
            "-",
            "-",
            "-",
            "-",
            "FAILED",
        ],
    ]
    # The exact text: padded columns, numbers right-aligned (the ids stand in the template as AAAAAAAA, ...).
    assert out == re.sub("([A-E])\\1{7}", lambda m: ids[m.group(1)], EXPECTED_MD)


def test_compare_csv_is_exact(sweep_store, capsys):
    ids = sweep_store["ids"]
    code, out, err = _run(capsys, "--sweep", "s2", "--format", "csv")
    assert code == 0, err
    std_q = math.sqrt(2) * 0.125  # sample std of 0.625 and 0.875
    std_tokens = math.sqrt(2) * 100  # of 1000 and 1200
    std_runtime = math.sqrt(2)  # of 10 and 12
    assert out.rstrip("\n").split("\n") == [
        "mark,run_id,run,model,data,task,bits,targets,r,alpha,seeds,eval_f1_macro,eval_f1_macro_std,trainable_params_m,"
        "trainable_params_m_std,trainable_pct,trainable_pct_std,peak_gpu_mem_gb,peak_gpu_mem_gb_std,"
        "train_tokens_per_s,train_tokens_per_s_std,train_runtime_s,train_runtime_s_std,status",
        f'best,{ids["A"]};{ids["B"]},tiny-16bit-attn_qv-r8-a16,tiny,topics,classification,16,"q_proj,v_proj",8,16,"1,2",'
        f"0.75,{float(f'{std_q:.10g}')},0.004096,0.0,0.5,0.0,2.0,0.0,1100.0,{float(f'{std_tokens:.10g}')},11.0,"
        f"{float(f'{std_runtime:.10g}')},FINISHED",
        f',{ids["C"]},tiny-16bit-all_linear-r16-a32,tiny,topics,classification,16,"q_proj,k_proj,v_proj,o_proj",16,32,1,'
        "0.75,,0.032768,,4.0,,3.0,,800.0,,20.0,,FINISHED",
        f',{ids["D"]},tiny-16bit-k_proj+o_proj-r4-a8,tiny,topics,classification,16,"k_proj,o_proj",4,8,1,'
        "0.6,,0.002048,,0.25,,1.5,,1500.0,,8.0,,FINISHED",
        f",{ids['E']},tiny-16bit-mlp-r8-a16,tiny,topics,classification,16,mlp,8,16,1,,,,,,,,,,,,,FAILED",
    ]


def test_compare_json_is_exact_and_sorts(sweep_store, capsys):
    ids = sweep_store["ids"]
    code, out, err = _run(
        capsys,
        "--experiment",
        "cmp",
        "--format",
        "json",
        "--no-group-seeds",
        "--sort",
        "params",
        "--pareto",
        "eval_f1_macro:max,memory",
    )
    assert code == 0, err
    table = json.loads(out)
    assert [c["key"] for c in table["columns"]] == [
        "run",
        "model",
        "data",
        "task",
        "bits",
        "targets",
        "r",
        "alpha",
        "seeds",
        "eval_f1_macro",
        "trainable_params_m",
        "trainable_pct",
        "peak_gpu_mem_gb",
        "train_tokens_per_s",
        "train_runtime_s",
        "status",
    ]
    rows = table["rows"]
    # The experiment holds the old sweep's child too; sorted by params, fewest first, missing last.
    assert [r["run_ids"] for r in rows] == [
        [ids["D"]],
        [ids["A"]],
        [ids["B"]],
        [ids["C"]],
        [rows[4]["run_ids"][0]],
        [ids["E"]],
    ]
    assert rows[4]["eval_f1_macro"] == 0.1  # the old sweep's child
    assert rows[1] == {
        "best": False,
        "pareto": False,
        "run_ids": [ids["A"]],
        "run": "tiny-16bit-attn_qv-r8-a16",
        "model": "tiny",
        "data": "topics",
        "task": "classification",
        "bits": 16,
        "targets": "q_proj,v_proj",
        "r": 8,
        "alpha": 16,
        "seeds": [1],
        "eval_f1_macro": 0.625,
        "trainable_params_m": 0.004096,
        "trainable_pct": 0.5,
        "peak_gpu_mem_gb": 2.0,
        "train_tokens_per_s": 1000.0,
        "train_runtime_s": 10.0,
        "status": "FINISHED",
        "std": {},
    }
    # Ungrouped, B (0.875) is best. Front on (quality max, memory min): D (0.6, 1.5) and B (0.875, 2.0);
    # A (0.625, 2.0) is dominated by B, C (0.75, 3.0) by B, the old child (0.1, no memory) has no point.
    assert {r["run_ids"][0] for r in rows if r["best"]} == {ids["B"]}
    assert {r["run_ids"][0] for r in rows if r["pareto"]} == {ids["D"], ids["B"]}
    assert rows[5]["status"] == "FAILED" and rows[5]["eval_f1_macro"] is None and rows[5]["targets"] == "mlp"


def test_compare_runs_selector_and_html(sweep_store, capsys):
    ids = sweep_store["ids"]
    code, out, err = _run(capsys, "--runs", f"{ids['C']},{ids['D']}", "--format", "html")
    assert code == 0, err
    assert err.strip() == "2 given run(s): 2 run(s) in 2 row(s); objective eval_f1_macro (max)"
    assert out.count("<tr>") == 2 and out.count('<tr class="best">') == 1  # header + D; C is best
    assert '<tr class="best"><td>best</td><td>tiny-16bit-all_linear-r16-a32</td>' in out
    # The 8-character ids the table prints select the same runs.
    code, out_short, err = _run(capsys, "--runs", f"{ids['C'][:8]},{ids['D'][:8]}", "--format", "html")
    assert code == 0, err
    assert out_short == out


def test_compare_refuses_an_unknown_run_prefix(sweep_store, capsys):
    code, _, err = _run(capsys, "--runs", "0123abcd")
    assert code != 0 and "no run '0123abcd'" in err


def test_plots_are_pngs_logged_to_the_parent_run(sweep_store, capsys, tmp_path):
    target = tmp_path / "plots" / "sweep.png"
    code, out, err = _run(capsys, "--plot", str(target))
    assert code == 0, err
    written = [target, target.with_name("sweep_memory.png"), target.with_name("sweep_curves.png")]
    for path in written:
        data = path.read_bytes()
        assert data[:8] == PNG_SIGNATURE, path
        assert len(data) > 10_000, (path, len(data))  # axes, points and labels, not an empty canvas
    client, parent = sweep_store["client"], sweep_store["parent"]
    logged = {(f.path, f.file_size) for f in client.list_artifacts(parent, "compare")}
    assert logged == {(f"compare/{p.name}", p.stat().st_size) for p in written}
    assert "logged 3 plot(s) to parent run" in err


def test_memory_plot_is_skipped_with_a_note_when_no_run_logged_memory(mlflow_store, tmp_path, capsys):
    import mlflow

    client = mlflow.MlflowClient(mlflow_store)
    experiment_id = client.create_experiment("cpu", artifact_location=(tmp_path / "artifacts").as_uri())
    start, params, metrics, status = CHILDREN["C"]
    metrics = {k: v for k, v in metrics.items() if k != "peak_gpu_mem_gb"}
    _make_run(client, experiment_id, "solo", start, {**CHILD_PARAMS, **params}, metrics, status, {})
    code, out, err = _run(capsys, "--plot", str(tmp_path / "p.png"))
    assert code == 0, err
    assert (tmp_path / "p.png").read_bytes()[:8] == PNG_SIGNATURE
    assert (tmp_path / "p_curves.png").read_bytes()[:8] == PNG_SIGNATURE
    assert not (tmp_path / "p_memory.png").exists()
    assert "skipped p_memory.png: no run logged peak_gpu_mem_gb" in err
    assert "plots not logged: the runs share no parent run" in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--experiment", "nope"], "error: no experiment 'nope' in the store (known: Default, cmp, empty)"),
        (["--experiment", "empty"], "error: experiment 'empty' has no runs"),
        (["--sweep", "nope"], "error: no sweep 'nope' in the store"),
        (["--runs", "0123abc"], "error: no run '0123abc' in the store"),
        (
            ["--metric", "eval_bogus"],
            "error: unknown metric 'eval_bogus': no selected run logged it (logged: "
            "eval_accuracy, eval_f1_macro, objective, peak_gpu_mem_gb, train_loss, "
            "train_runtime_s, train_tokens_per_s, trainable_params, trainable_pct)",
        ),
        (["--pareto", "quality"], "error: --pareto takes two columns X,Y, got 'quality'"),
        (["--sort", "targets"], "error: cannot rank by 'targets': give a direction, e.g. targets:max or targets:min"),
    ],
)
def test_edge_cases_give_one_line_and_exit_2(sweep_store, capsys, argv, message):
    code, out, err = _run(capsys, *argv)
    assert (code, out, err) == (2, "", message + "\n")


def test_mixed_tasks_and_empty_store(mlflow_store, tmp_path, capsys):
    import mlflow

    client = mlflow.MlflowClient(mlflow_store)
    client.search_experiments()  # creates the store, so MLflow's set-up log is not in the captured output
    capsys.readouterr()
    code, out, err = _run(capsys)
    assert (code, err) == (2, "error: the store has no runs\n")  # only the Default experiment
    experiment_id = client.create_experiment("mixed", artifact_location=(tmp_path / "artifacts").as_uri())
    for i, task in enumerate(["classification", "sft", "sft"]):
        _make_run(
            client,
            experiment_id,
            f"run{i}",
            100 + i,
            {**CHILD_PARAMS, "data.task": task},
            {"objective": 0.5},
            "FINISHED",
            {},
        )
    code, out, err = _run(capsys, "--experiment", "mixed")
    assert (code, out, err) == (
        2,
        "",
        "error: the runs mix tasks (classification: 1, sft: 2); pass --task "
        "classification or sft, select one sweep, or pass --runs\n",
    )


@pytest.fixture
def mixed_store(mlflow_store, tmp_path):
    """What the README's three training examples and a study leave in one experiment: classification runs (one
    FAILED), a multilabel run and an SFT run, newest last."""
    import mlflow

    client = mlflow.MlflowClient(mlflow_store)
    experiment_id = client.create_experiment("lora-sweeps", artifact_location=(tmp_path / "artifacts").as_uri())
    made = {}
    for name, start, params, metrics, status in [
        ("cls-a", 100, {}, {"objective": 0.5, "eval_accuracy": 0.6}, "FINISHED"),
        ("cls-b", 110, {"model.name": "other"}, {"objective": 0.7, "eval_accuracy": 0.9}, "FINISHED"),
        ("cls-failed", 120, {"data.name": "intents"}, {}, "FAILED"),
        (
            "multi",
            130,
            {"data.task": "multilabel", "data.name": "topics_multilabel"},
            {"objective": 0.4, "eval_subset_accuracy": 0.3},
            "FINISHED",
        ),
        (
            "sft",
            140,
            {"data.task": "sft", "data.name": "instructions"},
            {"objective": 1.5, "eval_loss": 1.5},
            "FINISHED",
        ),
    ]:
        made[name] = _make_run(client, experiment_id, name, start, {**CHILD_PARAMS, **params}, metrics, status, {})
    return made


def _names(out: str) -> list[str]:
    return [line.split(" | ")[1].strip() for line in out.strip().split("\n")[2:]]


def test_a_metric_one_task_logs_compares_that_tasks_runs_with_a_note(mixed_store, capsys):
    """The README's `--experiment lora-sweeps --metric eval_accuracy --sort eval_accuracy`, after its SFT and
    multilabel examples: the classification runs are compared, the others are named as left out."""
    argv = ["--experiment", "lora-sweeps", "--metric", "eval_accuracy", "--sort", "eval_accuracy"]
    code, out, err = _run(capsys, *argv)
    assert code == 0, err
    assert _names(out) == ["cls-b", "cls-a", "cls-failed"]  # best first; the failed run of the task stays
    assert err.split("\n")[0] == (
        "left out 2 run(s) of tasks that do not log eval_accuracy (multilabel: 1, sft: 1); "
        "--task classification selects the same runs"
    )
    code, same, err = _run(capsys, *argv, "--task", "classification")
    assert (code, same) == (0, out) and "left out" not in err
    # A metric every task logs cannot pick one: the error names --task.
    code, _, err = _run(capsys, "--experiment", "lora-sweeps", "--metric", "objective", "--sort", "objective")
    assert code == 2 and "the runs mix tasks (classification: 3, multilabel: 1, sft: 1); pass --task" in err
    code, out, err = _run(capsys, "--experiment", "lora-sweeps", "--task", "sft")
    assert code == 0 and _names(out) == ["sft"], err


def test_task_data_and_model_filters(mixed_store, capsys):
    code, out, err = _run(capsys, "--experiment", "lora-sweeps", "--task", "classification", "--data", "topics")
    assert code == 0 and _names(out) == ["cls-a", "cls-b"], err
    code, out, err = _run(capsys, "--experiment", "lora-sweeps", "--model", "other")
    assert code == 0 and _names(out) == ["cls-b"], err
    code, out, err = _run(capsys, "--task", "multilabel")  # no selector: the newest matching run's experiment
    assert code == 0 and _names(out) == ["multi"], err
    code, out, err = _run(capsys, "--runs", f"{mixed_store['cls-a']},{mixed_store['sft']}", "--task", "sft")
    assert code == 0 and _names(out) == ["sft"], err
    # The filter is searched in the store, before --limit: the newest run (SFT) does not take the only place.
    code, out, err = _run(capsys, "--experiment", "lora-sweeps", "--task", "classification", "--limit", "1")
    assert code == 0 and _names(out) == ["cls-failed"], err
    code, out, err = _run(capsys, "--experiment", "lora-sweeps", "--task", "regression")
    assert (code, out, err) == (2, "", "error: experiment 'lora-sweeps' has no runs with data.task=regression\n")
    code, out, err = _run(capsys, "--data", "nope")
    assert (code, out, err) == (2, "", "error: the store has no runs with data.name=nope\n")


def test_runs_that_differ_only_in_a_param_show_it_and_their_ids(mlflow_store, tmp_path, capsys):
    """Two runs named alike (a grid over data.class_weights, say): the table shows each run's id and a column for
    every param that differs among its rows, and none for the params they share."""
    import mlflow

    client = mlflow.MlflowClient(mlflow_store)
    experiment_id = client.create_experiment("grid", artifact_location=(tmp_path / "artifacts").as_uri())
    start, params, metrics, status = CHILDREN["C"]
    made = [
        _make_run(
            client, experiment_id, "same-name", start + i, {**CHILD_PARAMS, **params, **extra}, metrics, status, {}
        )
        for i, extra in enumerate([{"data.class_weights": "null"}, {"data.class_weights": "balanced"}])
    ]
    code, out, err = _run(capsys, "--experiment", "grid")
    assert code == 0, err
    header, _, *rows = [[c.strip() for c in line.strip("|").split(" | ")] for line in out.strip().split("\n")]
    assert header[:3] == ["mark", "run", "run id"] and "data.class_weights" in header
    assert "lora.dropout" not in header and "train.seed" not in header  # the same in both rows, or a fixed column
    at = header.index("data.class_weights")
    assert [(row[1], row[2], row[at]) for row in rows] == [
        ("same-name", made[0][:8], "-"),
        ("same-name", made[1][:8], "balanced"),
    ]
    code, out, err = _run(capsys, "--experiment", "grid", "--format", "csv")
    assert code == 0, err
    keys = out.split("\n")[0].split(",")
    assert "data.class_weights" in keys and "id" not in keys  # csv carries the whole run ids in run_id


def test_a_lora_variant_shows_as_a_column_and_a_run_stored_before_it_existed_as_plain_lora(
    mlflow_store, tmp_path, capsys
):
    """A run stored before lora.use_dora existed trained plain LoRA: it compares, and groups its seeds, with one that
    logged use_dora=False; the column shows where runs differ in the variant."""
    import mlflow

    client = mlflow.MlflowClient(mlflow_store)
    experiment_id = client.create_experiment("variants", artifact_location=(tmp_path / "artifacts").as_uri())
    start, params, metrics, status = CHILDREN["C"]
    stored_before = {k: v for k, v in {**CHILD_PARAMS, **params}.items() if not k.startswith("lora.use_")}
    dora, plain = {"lora.use_dora": "True", "lora.use_rslora": "False"}, {"lora.use_dora": "False", "train.seed": "2"}
    variants = [{}, dora, plain]
    made = [
        _make_run(client, experiment_id, f"run{i}", start + i, {**stored_before, **extra}, metrics, status, {})
        for i, extra in enumerate(variants)
    ]
    code, out, err = _run(capsys, "--experiment", "variants", "--format", "json")
    assert code == 0, err
    table = json.loads(out)
    keys = [c["key"] for c in table["columns"]]
    assert "lora.use_dora" in keys and "lora.use_rslora" not in keys  # plain LoRA, stored or logged
    shown = sorted((sorted(row["run_ids"]), row["lora.use_dora"]) for row in table["rows"])
    assert shown == sorted([(sorted([made[0], made[2]]), "False"), ([made[1]], "True")])


def test_compare_never_ranks_a_run_that_did_not_finish():
    rows = [
        {"objective": 0.99, "status": "KILLED", "trainable_params_m": 1.0},
        {"objective": 0.95, "status": "RUNNING", "trainable_params_m": 1.0},
        {"objective": 0.50, "status": "FINISHED", "trainable_params_m": 1.0},
    ]
    assert pick_best(rows, "objective", "max") == 2
