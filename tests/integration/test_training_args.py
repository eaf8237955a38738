"""src.training_args: the Trainer's arguments from the ``train`` config, shared by src.fit and the benchmarks."""

from __future__ import annotations

import subprocess
import sys

from omegaconf import OmegaConf

from src.config import TrainConfig
from src.training_args import training_arguments
from tests.conftest import CONF_DIR, ROOT

# In a fresh interpreter: the test process has imported mlflow long before (conftest, other tests).
BUILD_BOTH = """
import sys
from omegaconf import OmegaConf
from src.config import TrainConfig
from src.training_args import training_arguments
train = TrainConfig(**OmegaConf.to_container(OmegaConf.load("conf/train/default.yaml")))
sft = training_arguments(train, "unused", "sft", 64)
classifier = training_arguments(train, "unused", "classification", 64)
print(type(sft).__name__, type(classifier).__name__, "mlflow" in sys.modules)
"""


def _default_train(**changes) -> TrainConfig:
    fields = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "train" / "default.yaml"))
    return TrainConfig(**(fields | changes))


def test_building_the_arguments_imports_nothing_of_mlflow():
    proc = subprocess.run([sys.executable, "-c", BUILD_BOTH], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["SFTConfig", "TrainingArguments", "False"]


def test_every_train_field_reaches_the_arguments_or_is_the_project_s_own():
    train = _default_train(learning_rate=3e-4, seed=7, gradient_accumulation_steps=2, resume_from_checkpoint="latest")
    args = training_arguments(train, "out", "sft", 96, response_only_loss=False)
    assert (args.learning_rate, args.seed, args.gradient_accumulation_steps) == (3e-4, 7, 2)
    assert (args.max_length, args.completion_only_loss, args.packing) == (96, False, False)
    assert args.output_dir == "out" and args.report_to == [] and not args.logging_nan_inf_filter
    assert args.include_num_input_tokens_seen == "non_padding" and args.disable_tqdm
    assert args.resume_from_checkpoint is None  # src.fit resolves "latest" and hands train() the path
    classifier = training_arguments(train, "out", "classification", 96)
    assert type(classifier).__name__ == "TrainingArguments" and not hasattr(classifier, "completion_only_loss")
