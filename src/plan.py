"""Plan a run before it runs: exact parameter counts and an estimate of peak GPU memory.

    python -m src.plan model=openllama3b quant=4bit lora=all_linear train=gpu
    python -m src.plan model=openllama3b model.name_or_path=/dir/with/config.json lora.r=16
    python -m src.plan -cd sweeps -cn seed_table        # another config dir/name; each row of a sweep's rows

It takes the same overrides as ``src.train`` and prints :func:`src.memory.plan`'s result: a table, then, as the
last stdout line, a JSON object (``trainable_params``, ``total_params``, ``est_peak_gpu_mem_gb``, ...). It reads
no weights and never downloads; :mod:`src.memory` says how memory is estimated, and ``benchmarks/results/`` how
the estimate compares with measured peaks.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

from src.config import CONF_DIR, Config, check_overrides, compose, validate
from src.errors import run_cli
from src.memory import MemoryPlan, PlanError, optimizer_state_bytes, plan, plan_pack, with_label_set


def _lora_row(result: MemoryPlan) -> str:
    if result.lora_preset == "none":
        return "none: full fine-tuning (every weight trains)"
    return f"{result.lora_preset} r={result.lora_r} on {result.lora_resolved_targets}"


def _memory_rows(result: MemoryPlan) -> list[tuple[str, str]]:
    rows = [("est. peak GPU mem", f"{result.est_peak_gpu_mem_gb:.2f} GiB")]
    breakdown = vars(result.est_mem_breakdown_gb)
    rows += [(f"  {name}", f"{gb:.2f} GiB") for name, gb in breakdown.items()]
    needed = f"{result.est_gpu_mem_needed_gb:.2f} GiB (with allocator reserve and CUDA context)"
    rows.append(("est. GPU mem needed", needed))
    return rows


def format_plan_table(result: MemoryPlan) -> str:
    """The human-readable summary printed above the JSON line."""
    tokens = result.batch_size * result.seq_len
    rows = [
        ("model", f"{result.model} ({result.architecture}), task {result.task}"),
        ("quantization", "FP8 base (e4m3, a scale per row)" if result.quant_fp8 else f"{result.quant_bits}-bit base"),
        ("lora", _lora_row(result)),
        ("trainable params", f"{result.trainable_params:,} ({result.trainable_pct:.3f}%)"),
        ("total params", f"{result.total_params:,}"),
        ("batch x seq", f"{result.batch_size} x {result.seq_len} = {tokens:,} tokens"),
    ]
    if result.tokens_per_micro_batch is not None:
        rows.append(("packed micro-batch", f"{result.tokens_per_micro_batch:,} tokens (sized for these)"))
    rows += [
        ("optimizer", f"{result.optim} ({optimizer_state_bytes(result.optim)} bytes state/param)"),
        ("activation ckpt", "on" if result.activation_checkpointing else "off"),
    ]
    if result.task == "sft":
        head = "TRL's fused, tiled LM head" if result.fused_lm_head else "the model's own loss (full logits)"
        if result.fused_loss:
            head = "the fast path's fused loss (one chunk of logits at a time)"
        rows.append(("sft loss via", head))
    rows += _memory_rows(result)
    rows += [("warning", w) for w in result.warnings]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def _composed(args, extra: Sequence[str] = ()) -> Config:
    """The config of the command's overrides, then ``extra`` (a pack's trial, a sweep's row), with its label set."""
    from hydra.errors import HydraException

    try:
        return with_label_set(validate(compose([*args.overrides, *extra], args.config_dir, args.config_name)))
    except HydraException as exc:  # an unknown group option or a bad override: the user's to fix
        raise PlanError(str(exc)) from exc


def sweep_rows(args) -> list[str]:
    """The rows of a grid sweep config (``hydra.sweeper.rows``, as the seed table lists them); [] for others."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf

    check_overrides(args.overrides, args.config_dir, args.config_name)
    try:
        with initialize_config_dir(config_dir=str(Path(args.config_dir).resolve()), version_base="1.3"):
            composed = hydra_compose(args.config_name, list(args.overrides), return_hydra_config=True)
    except HydraException as exc:
        raise PlanError(str(exc)) from exc
    rows = OmegaConf.select(composed, "hydra.sweeper.rows", default=None)
    return [str(row) for row in OmegaConf.to_container(rows)] if rows else []


def print_pack(args) -> None:
    """``--pack``: each trial's table, then the pack's estimate and its JSON line."""
    result = plan_pack([_composed(args, shlex.split(t)) for t in args.pack])
    for trial, single in zip(args.pack, result.trials):
        print(f"--- trial: {trial}")
        print(format_plan_table(single))
    print(
        f"--- pack of {result.pack_size}: est. peak GPU mem {result.est_peak_gpu_mem_gb:.2f} GiB, the base "
        f"once ({result.est_solo_sum_gb:.2f} GiB as {result.pack_size} runs at once); "
        f"{result.est_gpu_mem_needed_gb:.2f} GiB needed"
    )
    print(json.dumps(result.as_dict()))


def print_plans(args) -> None:
    """The config's table and JSON line; a sweep's rows each, as its jobs will train them."""
    rows = sweep_rows(args)
    for i, row in enumerate(rows or [""]):
        if rows:
            print(f"--- row {i + 1}/{len(rows)}: {row}")
        result = plan(_composed(args, shlex.split(row)))
        print(format_plan_table(result))
        print(json.dumps(result.as_dict()))


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m src.plan", description="Parameter counts and a peak GPU memory estimate for a config."
    )
    parser.add_argument("-cd", "--config-dir", type=Path, default=CONF_DIR, help="Hydra config directory.")
    parser.add_argument("-cn", "--config-name", default="config", help="Hydra config name.")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for src.train.")
    parser.add_argument(
        "--pack",
        action="append",
        default=[],
        metavar="OVERRIDES",
        help="plan a pack (hydra.sweeper.pack): one trial per --pack, its overrides (quoted) after the common ones; "
        "the base counts once",
    )
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    args = parser().parse_args(argv)
    if args.pack:
        return run_cli(lambda: print_pack(args))
    from src.console import quiet_libraries

    quiet_libraries()
    return run_cli(lambda: print_plans(args))


if __name__ == "__main__":
    sys.exit(main())
