"""Training throughput and memory: the seeds' QLoRA recipe against the fast path (:mod:`benchmarks.sft`), and packed
trials against the same trials one after another.

python -m src.bench                                        # W3B 4-bit; fast path at the default and 8 GiB budgets
python -m src.bench --device cpu --workload tiny --examples 16   # smoke test: the code paths, not the numbers
torchrun --standalone --nproc_per_node 2 -m src.bench --sides fast --budgets default   # DDP on 2 GPUs
python -m src.bench --workload w3b-4bit-pack4              # 4 trials one by one, then as one pack (issue 19)
python -m src.bench --workload tiny-pack3 --device cpu --examples 24   # its smoke test
python -m src.bench --workload w3b-4bit-pack4 --override train.pack_cuda_graphs=true --profile step.txt
python -m src.bench --workload w3b-4bit-grid16             # a whole grid sweep: pack=1, then pack=4 (makespan.py)
python -m src.bench --workload w3b-4bit-study16            # a whole study: pack=1, then pack=4 with pruning

A pack workload trains its trials through ``src.train`` itself, in this process: first each alone (``src.fit.run``,
the sequential side), then all as one pack (``src.sweeps.job.run_pack_job``, the packed side), on the same random-
weight base (``benchmarks.workloads.ensure_checkpoint``, with the tiny model's tokenizer) and the same synthetic
instruction rows (``--examples`` rows, lengths like the bench's SFT rows), tracked in a throwaway MLflow store. Per
side: the wall time, tokens/s summed over the trials (each trial's ``train_tokens`` over the side's wall time),
MFU, the peak GPU memory, and each trial's final ``eval_loss``.

The sweep makespan workloads (``w3b-4bit-grid16``, ``w3b-4bit-study16`` and their CPU smoke tests ``tiny-grid4``,
``tiny-study4``) live in :mod:`benchmarks.makespan`: they time whole sweeps as ``python -m src.train --multirun``
subprocesses, on this module's base and rows (:func:`text_checkpoint`, :func:`write_rows`, :func:`pack_overrides`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tempfile
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from src import console


@dataclass(frozen=True)
class PackWorkload:
    name: str
    base: str  # a benchmarks.workloads workload: the architecture and base bits
    trials: tuple[tuple[str, ...], ...]  # each trial's overrides
    train: tuple[str, ...] = ()


ALL_LINEAR_AND_HEAD = ("lora=all_linear", "lora.target_modules=[all_linear,lm_head]")
PACK_WORKLOADS = {
    w.name: w
    for w in (
        # The issue's grid: r in {8, 16} x targets in {q,v ; all linear + lm_head} on W3B 4-bit, the seeds' lr.
        PackWorkload(
            "w3b-4bit-pack4",
            "w3b-4bit",
            (
                ("lora=attn_qv", "lora.r=8"),
                ("lora=attn_qv", "lora.r=16"),
                (*ALL_LINEAR_AND_HEAD, "lora.r=8"),
                (*ALL_LINEAR_AND_HEAD, "lora.r=16"),
            ),
            ("train=gpu",),
        ),
        PackWorkload(
            "tiny-pack3",
            "tiny",
            (("lora=attn_qv", "lora.r=4"), ("lora=all_linear", "lora.r=8"), (*ALL_LINEAR_AND_HEAD, "lora.r=2")),
        ),
        # The issue's classification target: seed 000's recipe (Mistral-7B 4-bit, multi-label, pos_weight, q/k/v/o)
        # as a grid of 4 over rank and alpha, in bf16 on the GPU, one epoch.
        PackWorkload(
            "mistral7b-4bit-multilabel-pack4",
            "mistral7b-4bit-multilabel",
            tuple((f"lora.r={r}", f"lora.alpha={a}") for r in (8, 16) for a in (8, 32)),
            ("train.bf16=true", "train.tf32=true"),
        ),
        PackWorkload(  # its CPU smoke test
            "tiny-multilabel-pack2",
            "tiny-multilabel",
            (("lora.r=4", "lora.alpha=8"), ("lora.r=8", "lora.alpha=8")),
        ),
    )
}


def text_checkpoint(model_dir: Path) -> Path:
    """The bench's random-weight checkpoint with the tiny model's tokenizer beside it (src.train reads text)."""
    from transformers import AutoTokenizer

    from src.tiny import resolve_builtin

    out = model_dir.with_name(model_dir.name + "-text")
    if (out / "DONE").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    for item in model_dir.iterdir():
        if item.name.endswith((".safetensors", ".json")) and "token" not in item.name:
            target = out / item.name
            if not target.exists():
                target.symlink_to(item.resolve())
    AutoTokenizer.from_pretrained(resolve_builtin("builtin:tiny-llama")).save_pretrained(out)
    (out / "DONE").write_text("1")
    return out


def instruction_rows(n: int, seed: int = 0) -> list[dict[str, str]]:
    """``n`` instruction/response rows of random words: instructions of 8-30 words, responses of 30-160."""
    import random

    rng = random.Random(seed)
    words = [w for w in "the of and to in is for on with as by at from that this it an be are or was we can".split()]
    words += [f"word{i}" for i in range(200)]

    def text(lo: int, hi: int) -> str:
        return " ".join(rng.choice(words) for _ in range(rng.randint(lo, hi)))

    return [{"instruction": text(8, 30), "input": "", "output": text(30, 160)} for _ in range(n)]


def run_pack_workload(
    workload: PackWorkload,
    examples: int,
    device: str,
    model_root: Path,
    work: Path,
    sides_run: tuple[str, ...] = ("sequential", "packed"),
    profile: Optional[Path] = None,
) -> dict:
    """Both sides of a pack workload (or those in ``sides_run``), one after the other; their measurements. With
    ``profile``, one joint step of the packed side is profiled into that file."""
    from benchmarks.workloads import WORKLOADS, ensure_checkpoint

    base = WORKLOADS[workload.base]
    model_dir = text_checkpoint(ensure_checkpoint(base, model_root, device))
    data = write_rows(work / "data", examples, base)
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / 'mlflow.db'}"
    common = pack_overrides(workload.train, base, model_dir, data, device)
    sides: dict[str, dict[str, Any]] = {}
    for name in sides_run:
        if name == "packed":
            sides[name] = run_packed(workload, common, work, device, profile)
        else:
            sides[name] = run_sequential(workload, common, work, device)
        # Said as each side ends, so that a bench cut short still tells what it measured.
        console.say(f"{workload.name} {name}: {sides[name]['wall_s']:.1f} s, peak {sides[name]['peak_gb']}")
    measure(sides, base, device)
    result = {"workload": workload.name, "examples": examples, "trials": [" ".join(t) for t in workload.trials]}
    result["overrides"] = list(workload.train)  # every trial's, both sides
    result["sides"] = sides
    if len(sides) == 2:
        seq, packed = sides["sequential"], sides["packed"]
        result["speedup"] = seq["wall_s"] / packed["wall_s"]
        result["eval_loss_rel_diff"] = [
            None if a is None or b is None else abs(b - a) / abs(a)
            for a, b in zip(seq["eval_loss"], packed["eval_loss"])
        ]
    return result


def write_rows(data: Path, examples: int, base=None) -> Path:
    """``examples`` training rows and 128 eval rows in ``data``: instruction rows as JSON lines, or for a multi-label
    workload (``base``'s task) seed 000's columns as CSV (:func:`paper_rows`)."""
    data.mkdir(parents=True, exist_ok=True)
    if base is not None and base.task == "multilabel":
        import csv

        rows = paper_rows(examples + 128)
        for name, part in (("train", rows[:examples]), ("eval", rows[examples:])):
            with open(data / f"{name}.csv", "w", newline="") as handle:
                writer = csv.DictWriter(handle, fieldnames=list(part[0]))
                writer.writeheader()
                writer.writerows(part)
        return data
    rows = instruction_rows(examples + 128)
    for name, part in (("train", rows[:examples]), ("eval", rows[examples:])):
        (data / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    return data


def paper_rows(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """``n`` rows with seed 000's columns (conf/data/research_topics.yaml): an ID, a title of 6-14 random words, an
    abstract of 90-220, and its six 0/1 label columns (each on at probability 0.3, at least one on)."""
    import random

    from omegaconf import OmegaConf

    from benchmarks.classification import synthetic_labels
    from src.paths import PROJECT_ROOT

    rng = random.Random(seed)
    words = "the of and to in is for on with as by at from that this it an be are or was we can".split()
    words += [f"word{i}" for i in range(200)]
    columns = list(OmegaConf.load(PROJECT_ROOT / "conf" / "data" / "research_topics.yaml").label_columns)
    labels = synthetic_labels(n, len(columns), multilabel=True, seed=seed + 1)
    return [
        {
            "ID": i,
            "TITLE": " ".join(rng.choice(words) for _ in range(rng.randint(6, 14))),
            "ABSTRACT": " ".join(rng.choice(words) for _ in range(rng.randint(90, 220))),
            **{c: int(v) for c, v in zip(columns, row)},
        }
        for i, row in enumerate(labels)
    ]


def pack_overrides(train: tuple[str, ...], base, model_dir: Path, data: Path, device: str) -> list[str]:
    """The overrides every trial of both sides shares: the base, the rows, one epoch evaluated only at its end, and
    the workload's ``train`` overrides."""
    if base.task == "sft":
        recipe = []
        rows = ["data=instructions", f"data.path={data / 'train.jsonl'}", f"data.eval_path={data / 'eval.jsonl'}"]
    else:  # the seed recipe first (what follows overrides it), on the rows written here, with no best-model reload
        recipe = [r for r in base.recipe if not r.startswith("data.path=")]
        rows = [f"data.path={data / 'train.csv'}", f"data.eval_path={data / 'eval.csv'}"]
        rows += ["train.load_best_model_at_end=false", "train.activation_checkpointing=false"]
    common = [
        *recipe,
        f"model={base.model_group}",
        f"model.name_or_path={model_dir}",
        f"quant={base.quant_group}",
        *rows,
        "data.num_sample_prompts=0",
        *train,
        "train.max_steps=-1",
        "train.num_train_epochs=1",
        "train.eval_strategy=no",
        "train.save_strategy=no",
        "train.logging_steps=10",
        "tracking.log_adapter=false",
    ]
    if device == "cpu":
        common += ["train.bf16=false", "train.tf32=null", "quant.compute_dtype=float32"]
    return common


def trial_config(workload: PackWorkload, common: list[str], output_dir: Path, i: int) -> tuple[dict, Any]:
    """Trial ``i``'s composed (raw, validated) config."""
    from src.config import compose, validate

    raw = compose([*common, *workload.trials[i]], output_dir=str(output_dir / f"t{i}"))
    return raw, validate(raw, for_training=True)


def reset_peak(device: str) -> None:
    import gc

    import torch

    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gb(device: str) -> Optional[float]:
    import torch

    return torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None


def run_sequential(workload: PackWorkload, common: list[str], work: Path, device: str) -> dict[str, Any]:
    """Each trial alone, as a sweep with pack=1 trains it (without the process start)."""
    import mlflow

    import src.fit

    run_ids, peaks = [], []
    start = time.perf_counter()
    for i in range(len(workload.trials)):
        reset_peak(device)
        src.fit.run(trial_config(workload, common, work / "sequential", i)[1])
        run_ids.append(mlflow.last_active_run().info.run_id)
        peaks.append(peak_gb(device))
    return {"wall_s": time.perf_counter() - start, "run_ids": run_ids, "peak_gb": peaks}


def run_packed(
    workload: PackWorkload, common: list[str], work: Path, device: str, profile: Optional[Path] = None
) -> dict[str, Any]:
    """All trials as one pack; with ``profile``, one joint step is profiled (:func:`profiled_joint_step`)."""
    from src.sweeps.job import run_pack_job

    reset_peak(device)
    start = time.perf_counter()
    members = [(trial_config(workload, common, work / "packed", i)[0], None) for i in range(len(workload.trials))]
    with profiled_joint_step(profile, device) as summary:
        result = run_pack_job(members, isolate=False)
    wall = time.perf_counter() - start
    bad = [r for r in result["pack"] if r["status"] != "ok"]
    if bad:
        raise RuntimeError(f"packed side: {bad}")
    side = {"wall_s": wall, "run_ids": [r["run_id"] for r in result["pack"]], "peak_gb": [peak_gb(device)]}
    if summary:
        side["profile"] = summary
    return side


@contextmanager
def profiled_joint_step(path: Optional[Path], device: str, at: int = 10) -> Iterator[dict[str, Any]]:
    """With ``path``: the pack's joint step number ``at`` (one forward, backward and optimizer step of all its live
    trials, in the thread that runs it) under ``torch.profiler``, its operators by GPU time written to ``path``; the
    yielded dict gets the summary (:class:`benchmarks.common.StepProfiler`). The profiled step is slower than the
    others; the side's timing includes it."""
    if path is None:
        yield {}
        return
    from benchmarks.common import StepProfiler
    from src.packs.model import Pack

    profiler = StepProfiler(path, start=at, device=device, steps=1)
    unprofiled = Pack._joint_step

    def joint_step(pack, batch):
        if pack.steps != at:
            return unprofiled(pack, batch)
        profiler.begin()
        try:
            return unprofiled(pack, batch)
        finally:
            profiler.end(1)

    Pack._joint_step = joint_step
    try:
        yield profiler.summary
    finally:
        Pack._joint_step = unprofiled


def measure(sides: dict[str, dict[str, Any]], base, device: str) -> None:
    """Each side's tokens/s (its trials' train_tokens over its wall time), MFU and eval losses, from MLflow."""
    import mlflow

    from benchmarks.workloads import all_params, bf16_matmul_tflops, non_embedding_params

    peak_flops = bf16_matmul_tflops(device) * 1e12
    params, n_all = non_embedding_params(base), all_params(base)
    client = mlflow.MlflowClient()
    for side in sides.values():
        runs_ = [client.get_run(run_id) for run_id in side["run_ids"]]
        tokens = sum(r.data.metrics.get("train_tokens", 0.0) for r in runs_)
        side["tokens_per_s"] = tokens / side["wall_s"]
        side["mfu"] = 4 * params * side["tokens_per_s"] / peak_flops  # benchmarks.sft's MFU (LoRA: no weight grads)
        side["tf4n"] = 4 * n_all * side["tokens_per_s"] / 1e12  # other tools' figure
        side["eval_loss"] = [r.data.metrics.get("eval_loss") for r in runs_]
        side["train_tokens"] = tokens


def format_pack(result: dict) -> str:

    def gb(values: list[Optional[float]]) -> str:
        known = [v for v in values if v is not None]
        return f"{max(known):.2f}" if known else "-"

    lines = [
        f"{result['workload']}: {len(result['trials'])} trials, {result['examples']} examples each",
        f"{'side':<11} {'wall s':>8} {'tokens/s':>10} {'MFU':>6} {'4N TF/s':>8} {'peak GiB':>9}  eval_loss per trial",
    ]
    for name, side in result["sides"].items():
        losses = ", ".join("-" if v is None else f"{v:.4f}" for v in side["eval_loss"])
        lines.append(
            f"{name:<11} {side['wall_s']:>8.1f} {side['tokens_per_s']:>10,.0f} {side['mfu']:>6.1%} "
            f"{side['tf4n']:>8.3g} {gb(side['peak_gb']):>9}  {losses}"
        )
    if "speedup" in result:
        diffs = ", ".join("-" if d is None else f"{d:.2%}" for d in result["eval_loss_rel_diff"])
        lines.append(f"packed is {result['speedup']:.2f}x faster; eval_loss differences: {diffs}")
    return "\n".join(lines)


def workload_parser(description: str, workloads: Iterable[str]) -> argparse.ArgumentParser:
    """The arguments the pack and makespan benches share: one workload, its rows, the device, where the random-weight
    bases are kept and where the JSON goes."""
    parser = argparse.ArgumentParser(prog="python -m src.bench", description=description)
    parser.add_argument("--workload", required=True, choices=list(workloads), help="the workload to run")
    parser.add_argument("--examples", type=int, default=2048, help="training rows (one epoch each trial)")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--model-dir", type=Path, default=Path(tempfile.gettempdir()) / "lora-bench-models")
    parser.add_argument("--json", type=Path, default=None, help="default: outputs/bench/<date>-<workload>.json")
    return parser


def pack_main(argv: list[str]) -> int:
    parser = workload_parser("Trial packs against the same trials one by one.", PACK_WORKLOADS)
    parser.add_argument("--sides", default="sequential,packed", help="which sides to run")
    parser.add_argument("--profile", type=Path, default=None, help="profile one joint step of the pack into FILE")
    parser.add_argument(
        "--override",
        action="append",
        default=[],
        help="a config override for every trial of both sides, after the workload's (repeatable): "
        "--override train.pack_cuda_graphs=true",
    )
    args = parser.parse_args(argv)
    previous = os.environ.get("MLFLOW_TRACKING_URI")
    try:
        with tempfile.TemporaryDirectory(prefix="lora-bench-pack-") as work:
            workload = PACK_WORKLOADS[args.workload]
            workload = dataclasses.replace(workload, train=(*workload.train, *args.override))
            sides = tuple(args.sides.split(","))
            if not sides or set(sides) - {"sequential", "packed"}:
                parser.error(f"--sides: sequential, packed or both, comma-separated; got {args.sides!r}")
            result = run_pack_workload(
                workload, args.examples, args.device, args.model_dir, Path(work), sides, args.profile
            )
    finally:  # the throwaway store is gone
        if previous is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = previous
    print(format_pack(result))
    write_result(result, args.device, args.json)
    return 0


def write_result(result: dict, device: str, out: Optional[Path]) -> Path:
    """The result, with the versions, date and device (and GPU) added, as JSON at ``out`` (None:
    outputs/bench/<date>-<workload>.json)."""
    from benchmarks.workloads import versions

    result.update(versions=versions(), date=time.strftime("%Y-%m-%d %H:%M:%S"), device=device)
    if device == "cuda":
        import torch

        result["gpu"] = torch.cuda.get_device_name()
    out = out or Path("outputs/bench") / f"{time.strftime('%Y%m%d-%H%M%S')}-{result['workload']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    console.say(f"results: {out}")
    return out
