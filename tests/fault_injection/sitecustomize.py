"""Test-only fault injection for sweep tests; Python loads this at start-up through PYTHONPATH.

It is never installed or imported by the project. ``LORA_SWEEPS_TEST_FAULT=KIND:R`` makes the
trials whose LoRA rank is R fail in a real trial process:

- ``oom:R``: ``torch.cuda.OutOfMemoryError`` from the second training step (a CUDA OOM, on CPU);
- ``fill_gpu:R``: a real CUDA OOM at the second training step: it takes the device's memory in 1 GiB blocks
  until PyTorch's allocator raises OutOfMemoryError, and holds them while the error unwinds, as a trial whose
  batch does not fit does (GPU only);
- ``nan_objective:R`` / ``inf_objective:R``: the final evaluation reports the objective as NaN / inf.
"""

import importlib.abc
import importlib.util
import os
import sys

_SPEC = os.environ.get("LORA_SWEEPS_TEST_FAULT")


def _rank(model) -> int:
    config = getattr(model, "peft_config", {}).get("default")
    return getattr(config, "r", -1)


def _patch(kind: str, rank: int, Trainer) -> None:
    import torch

    if kind in ("fill_gpu", "oom"):

        def fault(self) -> None:
            if _rank(self.model) != rank or self.state.global_step < 1:
                return
            if kind == "oom":
                raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected by the test at step 2)")
            held = []
            try:
                while True:
                    held.append(torch.empty(2**30, dtype=torch.uint8, device="cuda"))
            except torch.OutOfMemoryError:
                print(f"fault: held {len(held)} GiB of GPU memory when CUDA ran out", flush=True)
                raise

        def wrap(original):
            def training_step(self, model, inputs, *args, **kwargs):
                fault(self)
                return original(self, model, inputs, *args, **kwargs)

            return training_step

        # The project's trainers override training_step (a CUDA graph replay never calls the Trainer's): every
        # subclass that defines its own is wrapped too, as it is defined.
        Trainer.training_step = wrap(Trainer.training_step)
        subclass_hook = Trainer.__init_subclass__

        def __init_subclass__(cls, **kwargs):
            subclass_hook(**kwargs)
            if "training_step" in cls.__dict__:
                cls.training_step = wrap(cls.__dict__["training_step"])

        Trainer.__init_subclass__ = classmethod(__init_subclass__)
    else:
        original_evaluate = Trainer.evaluate
        bad = float("nan") if kind == "nan_objective" else float("inf")

        def evaluate(self, *args, **kwargs):
            metrics = original_evaluate(self, *args, **kwargs)
            if _rank(self.model) == rank:
                metrics = {k: (bad if k.startswith("eval_f1") else v) for k, v in metrics.items()}
            return metrics

        Trainer.evaluate = evaluate


class _AfterTrainerImport(importlib.abc.MetaPathFinder):
    """Patches ``transformers.trainer`` once it is imported, and not before.

    Importing it here would start CUDA: it imports peft, and peft imports bitsandbytes, which asks CUDA for
    the device at import. In the sweeper's fork server that breaks every trial forked from it on a GPU, so
    the patch waits for the trial process's own import.
    """

    def __init__(self, kind: str, rank: int):
        self.kind, self.rank = kind, rank

    def find_spec(self, name, path=None, target=None):
        if name != "transformers.trainer":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return spec
        exec_module, hook = spec.loader.exec_module, self

        def exec_and_patch(module):
            exec_module(module)
            sys.meta_path.remove(hook)
            _patch(hook.kind, hook.rank, module.Trainer)

        spec.loader.exec_module = exec_and_patch
        return spec


if _SPEC:
    _kind, _r = _SPEC.split(":")
    sys.meta_path.insert(0, _AfterTrainerImport(_kind, int(_r)))
