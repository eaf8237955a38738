"""Test-only CUDA probe; Python loads this at start-up through PYTHONPATH. Never installed or imported by the project.

With ``LORA_SWEEPS_TEST_CUDA_PROBE=<file>`` set, every process of a sweep (the sweeper, the forkserver, launcher
workers) records each call that would start CUDA, one JSON line per call in ``<file>``: the process, the function
and the stack. A process that starts CUDA before it forks poisons its children ("Cannot re-initialize CUDA in
forked subprocess"), so only a trial process (multiprocessing's ``lora-sweep-job``) or a torchrun rank may.

On a CPU-only torch build nothing here starts CUDA, so the probe also makes torch *look* like a CUDA build
(``torch.backends.cuda.is_built() -> True``): the project then takes the code paths it takes on a GPU machine,
and a call such as ``torch.cuda.is_available()`` made where it must not be is recorded.
``torch.cuda.device_count()`` is not recorded: it asks NVML, which does not start CUDA.
"""

import os

_LOG = os.environ.get("LORA_SWEEPS_TEST_CUDA_PROBE")

# Each of these starts CUDA (the driver or PyTorch's lazy init) on a GPU machine.
_STARTERS = (
    "is_available",
    "init",
    "_lazy_init",
    "current_device",
    "set_device",
    "get_device_capability",
    "get_device_properties",
    "get_device_name",
    "mem_get_info",
    "synchronize",
    "is_bf16_supported",
    "memory_allocated",
    "max_memory_allocated",
    "reset_peak_memory_stats",
    "empty_cache",
)


def _allowed() -> bool:
    import multiprocessing

    return multiprocessing.current_process().name == "lora-sweep-job" or "LOCAL_RANK" in os.environ


def _record(name: str) -> None:
    import json
    import sys
    import traceback

    entry = {
        "pid": os.getpid(),
        "process": __import__("multiprocessing").current_process().name,
        "argv": sys.argv[:3],
        "call": f"torch.cuda.{name}",
        "stack": [f for f in traceback.format_stack(limit=60)[:-2] if "<frozen" not in f][-12:],
    }
    with open(_LOG, "a") as log:
        log.write(json.dumps(entry) + "\n")


def _wrap(name: str, original):
    def probe(*args, **kwargs):
        if not _allowed():
            _record(name)
        return original(*args, **kwargs)

    probe.__wrapped__ = original
    return probe


def _install() -> None:
    import sys

    import torch
    import torch.cuda

    torch.backends.cuda.is_built = lambda: True
    originals = {name: getattr(torch.cuda, name) for name in _STARTERS if hasattr(torch.cuda, name)}
    for module_name, module in list(sys.modules.items()):
        if module is None or not (module_name == "torch.cuda" or module_name.startswith("torch.cuda.")):
            continue
        for name, original in originals.items():
            if getattr(module, name, None) is original:
                setattr(module, name, _wrap(name, original))


if _LOG:
    _install()
