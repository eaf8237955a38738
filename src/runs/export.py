"""Merge a trained adapter into its base model: a standalone model directory for deployment.

    python -m src.export --run RUN_ID --out exported/topics-r8
    python -m src.export --adapter outputs/.../adapter --out exported/topics-r8
    python -m src.export --run RUN_ID --out exported/topics-r8 --log-to-mlflow

The base is loaded without quantization in the run's ``model.dtype`` (a 4- or 8-bit run is
merged into a 16-bit copy of its base), the adapter is applied and folded in with peft's
``merge_and_unload``, and the result is saved as safetensors with the tokenizer, the label
map (classifiers also carry ``id2label`` in config.json) and the run's config.yaml. It loads
with plain ``transformers``, no peft needed. ``--log-to-mlflow`` also logs it to the run with
MLflow's transformers flavour; training itself logs only the adapter, so a run never stores
the whole base model unless asked to here.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path
from typing import Optional

from src.errors import UserError, report, run_cli
from src.logger import say
from src.runs.inference import (
    LABEL_MAP_FILE,
    InferenceError,
    Source,
    add_source_arguments,
    load_finetuned,
    load_run_tokenizer,
    open_source_of,
    quiet_inference_libraries,
)

MERGED_MODEL_NAME = "merged_model"
PIPELINE_TASKS = {
    "classification": "text-classification",
    "multilabel": "text-classification",
    "sft": "text-generation",
}


def merge(source: Source, tokenizer):
    """The unquantized base with the adapter (and classifier head) merged in: a plain transformers model; a full
    fine-tuning run's model is one already."""
    model = load_finetuned(source, tokenizer, quantized=False)
    return model if source.full_model else model.merge_and_unload()


def export(source: Source, out_dir: Path):
    """Write the merged model, tokenizer, label map and config to ``out_dir``; return (model, tokenizer)."""
    if out_dir.exists() and not out_dir.is_dir():
        raise InferenceError(f"--out {out_dir} is a file; choose a new directory")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise InferenceError(f"--out {out_dir} exists and is not empty; choose a new directory")
    try:  # before the model loads: a parent that is a file, or no permission, fails at once
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InferenceError(f"--out {out_dir}: cannot create it ({exc.strerror}); choose another directory") from exc
    tokenizer = load_run_tokenizer(source)
    model = merge(source, tokenizer)
    model.save_pretrained(out_dir)  # safetensors, the transformers default
    tokenizer.save_pretrained(out_dir)
    if (source.adapter_dir / LABEL_MAP_FILE).is_file():
        shutil.copyfile(source.adapter_dir / LABEL_MAP_FILE, out_dir / LABEL_MAP_FILE)
    if source.config_path is not None:
        shutil.copyfile(source.config_path, out_dir / "config.yaml")
    return model, tokenizer


def pip_requirements() -> list[str]:
    """Pinned requirements of the logged model, from this environment (without local labels such as +cpu).

    Given explicitly because MLflow's inference of them reloads the model in a subprocess.
    """
    from importlib.metadata import version

    return [f"{name}=={version(name).split('+')[0]}" for name in ("transformers", "torch", "tokenizers", "safetensors")]


def log_to_mlflow(model, tokenizer, run_id: str, task: str) -> str:
    """Log the merged model to the run with MLflow's transformers flavour; return the model URI."""
    import mlflow

    # Logged from memory: MLflow 3.17's checkpoint-path logging fails on transformers 5 (lazy pipeline classes).
    with mlflow.start_run(run_id=run_id):
        info = mlflow.transformers.log_model(
            {"model": model, "tokenizer": tokenizer},
            name=MERGED_MODEL_NAME,
            task=PIPELINE_TASKS[task],
            pip_requirements=pip_requirements(),
        )
    return info.model_uri


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m src.export", description=__doc__.split("\n")[0])
    add_source_arguments(parser)
    parser.add_argument("--out", type=Path, required=True, help="new directory for the merged model")
    parser.add_argument(
        "--log-to-mlflow",
        action="store_true",
        help=f"also log the merged model to the run as '{MERGED_MODEL_NAME}' (transformers flavour)",
    )
    return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    if args.log_to_mlflow and args.adapter is not None:
        return report(UserError("--log-to-mlflow needs the run to log to: use --run or --sweep-best"))
    quiet_inference_libraries()

    def body() -> None:
        with open_source_of(args) as source:
            model, tokenizer = export(source, args.out)
            say(f"merged model written to {args.out}")
            if args.log_to_mlflow:
                uri = log_to_mlflow(model, tokenizer, source.run_id, source.task)
                say(f"logged to run {source.run_id} as {uri}")

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
