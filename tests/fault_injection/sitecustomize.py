"""Test-only fault injection for sweep tests; Python loads this at start-up through PYTHONPATH.

It is never installed or imported by the project. ``LORA_SWEEPS_TEST_FAULT=KIND:R`` makes the
trials whose LoRA rank is R fail in a real trial process:

- ``oom:R``: ``torch.cuda.OutOfMemoryError`` from the second training step (a CUDA OOM, on CPU);
- ``nan_objective:R`` / ``inf_objective:R``: the final evaluation reports the objective as NaN / inf.
"""

import os

_SPEC = os.environ.get("LORA_SWEEPS_TEST_FAULT")


def _rank(model) -> int:
    config = getattr(model, "peft_config", {}).get("default")
    return getattr(config, "r", -1)


def _install(kind: str, rank: int) -> None:
    import torch
    from transformers import Trainer

    if kind == "oom":
        original_step = Trainer.training_step

        def training_step(self, model, inputs, *args, **kwargs):
            if _rank(self.model) == rank and self.state.global_step >= 1:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected by the test at step 2)")
            return original_step(self, model, inputs, *args, **kwargs)

        Trainer.training_step = training_step
    else:
        original_evaluate = Trainer.evaluate
        bad = float("nan") if kind == "nan_objective" else float("inf")

        def evaluate(self, *args, **kwargs):
            metrics = original_evaluate(self, *args, **kwargs)
            if _rank(self.model) == rank:
                metrics = {k: (bad if k.startswith("eval_f1") else v) for k, v in metrics.items()}
            return metrics

        Trainer.evaluate = evaluate


if _SPEC:
    _kind, _r = _SPEC.split(":")
    _install(_kind, int(_r))
