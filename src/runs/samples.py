"""``compare --samples``: each SFT run's fixed prompts with the reference, the base model's and the tuned model's
output, as Markdown tables (the runs log them as ``samples.json``)."""

from __future__ import annotations

import json
from pathlib import Path

from src.data import ALPACA_NO_INPUT, ALPACA_WITH_INPUT
from src.runs.table import CompareError


def _sample_cell(text: str, width: int = 80, tail: int = 0) -> str:
    """One Markdown cell: whitespace collapsed, cut to ``width`` in the middle, keeping the last ``tail`` characters
    (0: cut at the end)."""
    text = " ".join(str(text).split())
    if len(text) > width:
        text = text[: width - tail - 1] + "…" + (text[-tail:] if tail else "")
    return text.replace("|", "\\|")


def _prompt_cell(prompt: str, width: int = 120) -> str:
    """A prompt as a reader needs it: the instruction from its start and the prompt's end, where the response
    begins; the template's fixed preamble (the same in every row) and, when long, the middle left out."""
    for template in (ALPACA_WITH_INPUT, ALPACA_NO_INPUT):
        preamble = template.split("### Instruction:")[0]
        prompt = prompt[len(preamble) :] if prompt.startswith(preamble) else prompt
    return _sample_cell(prompt, width, tail=24)


def samples_text(client, runs) -> str:
    """Markdown: each run's fixed prompts with the reference, the base model's and the tuned model's output."""
    import tempfile

    from mlflow.exceptions import MlflowException

    sections = []
    with tempfile.TemporaryDirectory() as tmp:
        for run in runs:
            try:
                path = client.download_artifacts(run.info.run_id, "samples.json", tmp)
            except (MlflowException, OSError):
                continue
            table = json.loads(Path(path).read_text())
            records = [dict(zip(table["columns"], row)) for row in table["data"]]
            lines = [
                f"### {run.info.run_name} ({run.info.run_id[:8]}): before and after fine-tuning",
                "",
                "| prompt | reference | before | after |",
                "|---|---|---|---|",
            ]
            lines += [
                f"| {_prompt_cell(r['prompt'])} | {_sample_cell(r['reference'])} | {_sample_cell(r['before'])} "
                f"| {_sample_cell(r['after'])} |"
                for r in records
            ]
            sections.append("\n".join(lines))
    if not sections:
        raise CompareError("--samples: no selected run logged samples.json (SFT runs log it)")
    return "\n\n".join(sections)
