"""`src.compare --samples`: SFT generations before and after fine-tuning, side by side."""

from __future__ import annotations

import mlflow
import pytest

from src.runs.compare import main


def _sft_run(name: str, after: list[str]) -> str:
    with mlflow.start_run(run_name=name) as run:
        mlflow.log_params(
            {
                "data.task": "sft",
                "model.name": "tiny",
                "quant.bits": 16,
                "lora.r": 8,
                "lora.alpha": 16,
                "lora.preset": "attn_qv",
            }
        )
        mlflow.log_metrics({"objective": 1.5, "eval_loss": 1.5, "trainable_params": 100, "total_params": 1000})
        mlflow.log_table(
            {
                "prompt": [
                    "### Instruction:\nGive the plural of the word.\n\n### Input:\nchef | cook\n",
                    "### Instruction:\nName the topic.\n",
                ],
                "reference": ["chefs", "food"],
                "before": ["on my mind", ""],
                "after": after,
            },
            artifact_file="samples.json",
        )
        return run.info.run_id


def test_samples_show_before_and_after_for_chosen_runs(mlflow_store, capsys):
    a = _sft_run("tiny-16bit-attn_qv-r8-a16", ["chefs", "food"])
    b = _sft_run("tiny-16bit-attn_qv-r16-a32", ["chef", "sports"])
    assert main(["--runs", f"{a},{b}", "--samples"]) == 0
    out = capsys.readouterr().out
    assert f"### tiny-16bit-attn_qv-r8-a16 ({a[:8]}): before and after fine-tuning" in out
    assert (
        "| ### Instruction: Give the plural of the word. ### Input: chef \\| cook | chefs | on my mind | chefs |" in out
    )
    assert "| ### Instruction: Name the topic. | food |  | sports |" in out


def test_samples_without_sft_runs_is_a_clear_error(mlflow_store, capsys):
    with mlflow.start_run() as run:
        mlflow.log_params({"data.task": "classification"})
        mlflow.log_metric("objective", 0.5)
    assert main(["--runs", run.info.run_id, "--samples"]) == 2
    assert "no selected run logged samples.json" in capsys.readouterr().err


@pytest.mark.parametrize("flag", [[], ["--format", "csv"]])
def test_table_alone_has_no_samples(mlflow_store, capsys, flag):
    run_id = _sft_run("r", ["x", "y"])
    assert main(["--runs", run_id, *flag]) == 0
    assert "before and after" not in capsys.readouterr().out


def test_a_long_prompt_shows_its_instruction_and_where_the_response_starts(mlflow_store, capsys):
    """A long Alpaca prompt keeps the instruction's start and the "### Response:" end: the middle is cut, and the
    template's preamble, the same in every row, is left out."""
    from src.data import format_prompt

    instruction = "Summarize the following customer review in one sentence for the support team."
    review = " ".join(["the delivery was late and the box arrived open"] * 12)
    prompts = [format_prompt(instruction, review, "alpaca"), format_prompt("Name | the topic.", "", "alpaca")]
    with mlflow.start_run(run_name="long") as run:
        mlflow.log_params({"data.task": "sft", "model.name": "tiny"})
        mlflow.log_metric("objective", 1.0)
        table = {"prompt": prompts, "reference": ["late", "x"], "before": ["", ""], "after": ["late box", "y"]}
        mlflow.log_table(table, artifact_file="samples.json")
    assert main(["--runs", run.info.run_id, "--samples"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ### Instruction:")]
    long_cell, short_cell = (line.split(" | ")[0] for line in lines)
    assert long_cell.startswith(f"| ### Instruction: {instruction} ")
    assert long_cell.endswith("open ### Response:") and "…" in long_cell
    assert len(long_cell) <= 2 + 120
    assert short_cell == "| ### Instruction: Name \\| the topic. ### Response:"
    assert "Below is an instruction" not in "\n".join(lines)
