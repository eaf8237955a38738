"""GPU acceptance suite: the issue's cases end to end, as a user runs them, on one GPU.

    python -m pytest -m gpu tests/gpu/test_gpu_acceptance.py -q -rA --durations=0                       # a CUDA machine
    LORA_GPU_SUITE_ON_CPU=1 python -m pytest -m gpu tests/gpu/test_gpu_acceptance.py -x -q --durations=0  # dry run, CPU

Every case is a real subprocess (``python -m src.train``, ``src.compare``, ``src.predict``,
``src.export``) run from the project root, with its own SQLite MLflow store (``MLFLOW_TRACKING_URI``),
Optuna storage and Hydra output directories under the test's tmp_path, and HF_HUB_OFFLINE=1. On a
GPU the models are random-weight bf16 checkpoints of real architectures, built once per session
(``LORA_GPU_SUITE_CACHE=DIR`` keeps them between sessions): the OpenLLaMA-3B shape of the seed table
for the seed-table sweep and its predict/export, and the Qwen2.5-0.5B shape for the other cases. Both
carry the tiny model's tokenizer (627 ids, all inside either vocabulary); the data are the bundled
files in ``src/assets/data``.

``LORA_GPU_SUITE_ON_CPU=1`` runs the same cases on a machine without CUDA with the tiny model
(``model=tiny train=default quant.compute_dtype=float32``), so the suite's own logic can be debugged
there; only what needs a GPU is left out (the exact OpenLLaMA-3B counts, peak and used GPU memory; the OOM,
real on the GPU, is raised by ``tests/fault_injection/sitecustomize.py`` in the dry run). The one switch
between the two is :class:`Suite`.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pytest
import torch

from tests.conftest import OPENLLAMA_3B, ROOT, compose_config, compose_hydra

ON_GPU = torch.cuda.is_available()
DRY_RUN = not ON_GPU and os.environ.get("LORA_GPU_SUITE_ON_CPU") == "1"

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not (ON_GPU or DRY_RUN), reason="needs a CUDA GPU (LORA_GPU_SUITE_ON_CPU=1 dry-runs it on CPU)"),
]

SWEEPS_DIR = ROOT / "sweeps"
FAULTS_DIR = ROOT / "tests" / "fault_injection"
EXPERIMENT = "lora-sweeps"
# Qwen/Qwen2.5-0.5B-Instruct's architecture (conf/model/qwen25_05b.yaml): 494,032,768 parameters, tied head.
QWEN25_05B = dict(
    hidden_size=896,
    intermediate_size=4864,
    num_hidden_layers=24,
    num_attention_heads=14,
    num_key_value_heads=2,
    vocab_size=151936,
    tie_word_embeddings=True,
    rope_theta=1_000_000.0,
    rms_norm_eps=1e-6,
    max_position_embeddings=32768,
)
SHAPES = {"w3b": ("llama", OPENLLAMA_3B), "qwen": ("qwen2", QWEN25_05B)}
# The seed table's trainable parameters on OpenLLaMA-3B, by (quant.bits, lora.r, LoRA on lm_head).
SEED_TABLE_COUNTS = {
    (4, 8, False): 2_662_400,
    (4, 16, False): 5_324_800,
    (4, 8, True): 12_994_560,
    (8, 8, True): 12_994_560,
}
# Subprocess limits: generous on CPU (2 shared cores), tight on the GPU, whose budget is 9 minutes for all.
TIMEOUT_S = 480 if ON_GPU else 1800
TAIL = 3000
# The bundled SFT examples are 105-114 tokens with the tiny tokenizer: a shorter limit would cut every
# completion away, and the fast path drops rows left without a label (all of them).
MAX_LENGTH = 128

BUILD_CHECKPOINTS = """
import json, sys, time
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

from src.tiny import resolve_builtin

tokenizer = AutoTokenizer.from_pretrained(resolve_builtin("builtin:tiny-llama"))
for directory, model_type, arch in json.loads(sys.argv[1]):
    directory = Path(directory)
    if (directory / "DONE").is_file():
        continue
    start = time.perf_counter()
    special = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
    config = AutoConfig.for_model(model_type, **{**special, **arch})  # an architecture's own ids win (Phi-3's)
    torch.manual_seed(0)
    build = AutoModel if model_type == "bert" else AutoModelForCausalLM  # an encoder: the base a classifier loads
    with torch.device("cuda"):  # initialized where it is fast; saved once, read from the page cache after
        model = build.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(directory)  # safetensors
    tokenizer.save_pretrained(directory)
    params = sum(p.numel() for p in model.parameters())
    (directory / "DONE").write_text(str(params))
    print(f"built {directory.name}: {params:,} parameters in {time.perf_counter() - start:.1f} s", flush=True)
    del model
    torch.cuda.empty_cache()
"""

# Merged vs unmerged logits of an exported run, both in float32 so that only the merge itself differs: the
# merged weights are bf16(W + BA) as export saves them, the unmerged ones W and BA apart (see test 4).
COMPARE_LOGITS = """
import dataclasses, json, sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from src.runs import inference

run_id, uri, merged_dir, texts = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
device = "cuda" if torch.cuda.is_available() else "cpu"
tokenizer = AutoTokenizer.from_pretrained(merged_dir)
batch = tokenizer(texts, return_tensors="pt", padding=True).to(device)
valid = batch["attention_mask"].bool()
with torch.no_grad():
    placement = {"device_map": {"": device}} if device == "cuda" else {}
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32, **placement).eval()
    got = merged(**batch).logits.float()[valid]
    del merged
    if device == "cuda":
        torch.cuda.empty_cache()
    with inference.open_source(run=run_id, tracking_uri=uri) as source:
        model_cfg = dataclasses.replace(source.cfg.model, dtype="float32")
        source = dataclasses.replace(source, cfg=dataclasses.replace(source.cfg, model=model_cfg))
        unmerged = inference.load_finetuned(source, inference.load_run_tokenizer(source), quantized=False)
        expected = unmerged(**batch).logits.float()[valid]
        with unmerged.disable_adapter():
            base = unmerged(**batch).logits.float()[valid]
print(json.dumps({
    "merge_error": (got - expected).abs().max().item(),
    "adapter_effect": (base - expected).abs().max().item(),
    "logit_scale": expected.abs().max().item(),
    "argmax_agreement": (got.argmax(-1) == expected.argmax(-1)).float().mean().item(),
    "positions": int(valid.sum()),
}))
"""

# Inputs for the logits check of test 4: an SFT prompt as training builds it, plain sentences, an empty text.
LOGIT_TEXTS = [
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n### Instruction:\nGive the plural of the "
    "word.\n\n### Input:\nrecipe\n\n### Response:\n",
    "the striker scored a late goal in the match",
    "a new laptop and a fast server, then garlic pasta from the oven",
    "",
]


# ---------------------------------------------------------------------------------------------
# The one switch between the GPU and the CPU dry run
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Suite:
    """Where the suite runs: random-weight real shapes on a GPU, or the tiny model on CPU (dry run)."""

    gpu: bool
    model_dirs: dict[str, str]  # shape -> directory (GPU only)

    def model(self, shape: str) -> list[str]:
        """Overrides that pick a model: ``w3b`` (OpenLLaMA-3B shape) or ``qwen`` (Qwen2.5-0.5B shape)."""
        if not self.gpu:
            return ["model=tiny", f"model.max_length={MAX_LENGTH}"]
        group = {"w3b": "openllama3b", "qwen": "qwen25_05b"}[shape]
        return [f"model={group}", f"model.name_or_path={self.model_dirs[shape]}", f"model.max_length={MAX_LENGTH}"]

    @property
    def train(self) -> list[str]:
        """The training recipe: the GPU one (bf16, checkpointing, paged 8-bit AdamW), or CPU float32."""
        base = ["train.logging_steps=1", "train.per_device_eval_batch_size=8"]
        if self.gpu:
            return ["train=gpu", *base]
        return ["train=default", "quant.compute_dtype=float32", "train.warmup_steps=0", *base]


@pytest.fixture(scope="session")
def suite(tmp_path_factory) -> Suite:
    from src.tiny import resolve_builtin

    resolve_builtin("builtin:tiny-llama")  # built once, before any parallel process needs it
    if not ON_GPU:
        return Suite(gpu=False, model_dirs={})
    root = Path(os.environ.get("LORA_GPU_SUITE_CACHE") or tmp_path_factory.mktemp("models"))
    dirs = {shape: root / f"random-{shape}" for shape in SHAPES}
    todo = [[str(dirs[shape]), model_type, arch] for shape, (model_type, arch) in SHAPES.items()]
    result = subprocess.run(
        [sys.executable, "-c", BUILD_CHECKPOINTS, json.dumps(todo)],
        cwd=ROOT,
        env=_env({}),
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-TAIL:]
    print(result.stdout, end="")
    return Suite(gpu=True, model_dirs={shape: str(path) for shape, path in dirs.items()})


# ---------------------------------------------------------------------------------------------
# Subprocesses, stores and runs
# ---------------------------------------------------------------------------------------------


def _env(extra: dict[str, str]) -> dict[str, str]:
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "MLFLOW_ENABLE_ASYNC_LOGGING": "false",
        "PYTHONUNBUFFERED": "1",
        **extra,
    }


@dataclass
class Store:
    """A test's own MLflow store (SQLite, artifacts beside it) and Optuna storage, under tmp_path."""

    root: Path

    @property
    def uri(self) -> str:
        return f"sqlite:///{self.root / 'mlflow.db'}"

    @property
    def optuna(self) -> str:
        return f"sqlite:///{self.root / 'optuna.db'}"

    def env(self, extra: Optional[dict[str, str]] = None) -> dict[str, str]:
        return _env({"MLFLOW_TRACKING_URI": self.uri, **(extra or {})})

    def runs(self) -> list:
        import mlflow

        client = mlflow.MlflowClient(self.uri)
        experiment = client.get_experiment_by_name(EXPERIMENT)
        if experiment is None:
            return []
        return client.search_runs([experiment.experiment_id], max_results=1000, order_by=["attributes.start_time ASC"])

    def split(self) -> tuple[list, list]:
        """(sweep parent runs, job runs), oldest first."""
        runs = self.runs()
        return (
            [r for r in runs if "mlflow.parentRunId" not in r.data.tags],
            [r for r in runs if "mlflow.parentRunId" in r.data.tags],
        )


def tail(result: subprocess.CompletedProcess) -> str:
    return f"exit code {result.returncode}; last output:\n" + ((result.stdout or "") + (result.stderr or ""))[-TAIL:]


@dataclass(frozen=True)
class Command:
    """``python -m MODULE ARGS`` from the project root, in the store's environment.

    ``merge``: stderr into stdout (one log, in order); else apart (for commands whose stdout is data).
    """

    module: str
    args: list[str]
    store: Store
    env: Optional[dict] = None
    merge: bool = True


class Started:
    """A :class:`Command` started now and waited for later; its output goes to a file, not an undrained pipe."""

    def __init__(self, command: Command):
        self.command, self.start = command, time.perf_counter()
        self.out = tempfile.TemporaryFile("w+")
        self.err = None if command.merge else tempfile.TemporaryFile("w+")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", command.module, *command.args],
            cwd=ROOT,
            env=command.store.env(command.env),
            stdout=self.out,
            stderr=subprocess.STDOUT if command.merge else self.err,
            text=True,
        )

    def wait(self) -> subprocess.CompletedProcess:
        """Wait (up to TIMEOUT_S from the start) and return the finished process with its output."""
        c = self.command
        try:
            try:
                self.proc.wait(timeout=max(1.0, self.start + TIMEOUT_S - time.perf_counter()))
            except subprocess.TimeoutExpired:
                self.out.seek(0)
                raise AssertionError(
                    f"python -m {c.module} ran past {TIMEOUT_S} s:\n{self.out.read()[-TAIL:]}"
                ) from None
            self.out.seek(0)
            stderr = None
            if self.err is not None:
                self.err.seek(0)
                stderr = self.err.read()
            print(f"{time.perf_counter() - self.start:6.1f} s  python -m {c.module} {shlex.join(c.args)[:160]}")
            return subprocess.CompletedProcess(self.proc.args, self.proc.returncode, self.out.read(), stderr)
        finally:
            self.close()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.out.close()
        if self.err is not None:
            self.err.close()


def run_together(*commands: Command) -> list[subprocess.CompletedProcess]:
    """Run independent commands at once (they share the GPU: each needs a fraction of it) and wait for all."""
    started = []
    try:
        for c in commands:
            started.append(Started(c))
        return [s.wait() for s in started]
    finally:
        for s in started:
            s.close()


def cli(module: str, args: list[str], store: Store, *, env: Optional[dict] = None, merge: bool = True):
    """One command (see :class:`Command`), waited for."""
    return run_together(Command(module, args, store, env, merge))[0]


def write_sweep(directory: Path, name: str, rows: list[str], body: str = "") -> Path:
    """A sweep config like those in sweeps/ (the project's conf on the search path), with explicit rows."""
    directory.mkdir(parents=True, exist_ok=True)
    listed = "\n".join(f"      - {json.dumps(row)}" for row in rows)
    text = (
        f"# python -m src.train -cd {directory} -cn {name}\n"
        "defaults:\n  - config\n  - _self_\n\n"
        f"{body}\n"
        "hydra:\n  searchpath:\n    - file://${project_root:}/conf\n  mode: MULTIRUN\n"
        f"  sweeper:\n    rows:\n{listed}\n"
    )
    (directory / f"{name}.yaml").write_text(text)
    return directory


def long_rows(max_length: int) -> str:
    """A data.text_template that makes every bundled topic text (8-11 tokens) at least ``max_length`` tokens
    long, so rows are truncated to exactly that (as src.plan assumes), and under 10x (a data fault)."""
    return " ".join(["{text}"] * (max_length // 8 + 8))


def job_number(run) -> int:
    """The job's number in its sweep, from its output directory (hydra.sweep.subdir starts with it)."""
    return int(Path(run.data.tags["output_dir"]).name.split("-")[0])


def markdown_rows(table: str) -> list[dict[str, str]]:
    """The rows of a Markdown table as {header: cell}."""
    lines = [line for line in table.splitlines() if line.startswith("|")]

    def cells(line: str) -> list[str]:
        return [c.strip() for c in line.strip().strip("|").split(" | ")]

    header = cells(lines[0])
    return [dict(zip(header, cells(line))) for line in lines[2:]]


def metric(run, name: str) -> float:
    assert name in run.data.metrics, f"run {run.info.run_name} logged no {name}: {sorted(run.data.metrics)}"
    return run.data.metrics[name]


def has_lm_head(run) -> bool:
    return "lm_head" in run.data.params["lora.resolved_targets"].split(",")


def row_key(run) -> tuple[int, int, bool]:
    return int(run.data.params["quant.bits"]), int(run.data.params["lora.r"]), has_lm_head(run)


def planned(overrides: list[str], config_dir: Path, name: str):
    """src.plan's result (what ``python -m src.plan -cd DIR -cn NAME OVERRIDES`` prints last) for a config."""
    from src.config import validate
    from src.memory import plan

    return plan(validate(compose_config(overrides, config_dir, name)))


def descendants(pid: int) -> set[int]:
    import psutil

    return {p.pid for p in psutil.Process(pid).children(recursive=True)}


def wait_for(condition, proc: subprocess.Popen, log: Path, timeout_s: float, what: str):
    """Poll ``condition()`` until it returns something truthy; fail with the log if the process ends first."""
    deadline = time.monotonic() + timeout_s
    while True:
        found = condition()
        if found:
            return found
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"{what} did not happen (exit code {proc.poll()}):\n{log.read_text()[-TAIL:]}")
        time.sleep(0.5)


# ---------------------------------------------------------------------------------------------
# 1. The seed_table sweep as shipped (4-bit and 8-bit rows), and src.compare on it
# ---------------------------------------------------------------------------------------------


@dataclass
class SeedTable:
    store: Store
    result: subprocess.CompletedProcess
    rows: list[str]
    plan_overrides: list[str]
    compare_md: Optional[subprocess.CompletedProcess] = None
    compare_json: Optional[subprocess.CompletedProcess] = None

    @property
    def sweep_id(self) -> str:
        parents, _ = self.store.split()
        assert len(parents) == 1, [p.info.run_name for p in parents]
        return parents[0].data.tags["sweep_id"]


def _seed_table_common(suite: Suite) -> list[str]:
    """The seed table's overrides: the OpenLLaMA-3B shape, shortened to 4 steps.

    The learning rate is raised (1e-2) so that 4 steps move the adapters far beyond bf16's resolution
    of the base weights; test 4 needs the merged adapter to be measurable.
    """
    return [
        *suite.model("w3b"),
        *suite.train,
        "data=instructions",
        "data.subsample=64",
        "data.eval_subsample=16",
        "data.num_sample_prompts=0",  # no generations before and after training: src.predict generates in test 4
        "train.max_steps=4",
        "train.learning_rate=1e-2",
    ]


@dataclass
class Launched:
    """One command of the first wave: where it ran, and how it ended."""

    root: Path
    store: Store
    result: subprocess.CompletedProcess


@pytest.fixture(scope="module")
def first_wave(suite, tmp_path_factory) -> dict[str, Launched]:
    """The suite's longest commands at once, each with its own store and directories: the seed_table sweep
    (test 1), the Optuna study's first run (test 2) and both classification runs (test 3). Together they use a
    fraction of one GPU's memory; one after the other they would take most of the suite's time budget.
    The OOM test, which needs the GPU to itself, runs last, long after they are all done.
    """
    commands: dict[str, tuple[Path, Command]] = {}
    root = tmp_path_factory.mktemp("seed_table")
    args = [
        "-cd",
        str(SWEEPS_DIR),
        "-cn",
        "seed_table",
        *_seed_table_common(suite),
        f"hydra.sweep.dir={root / 'multirun'}",
    ]
    commands["seed_table"] = (root, Command("src.train", args, Store(root)))
    root = tmp_path_factory.mktemp("optuna")
    commands["optuna"] = (root, Command("src.train", _optuna_args(suite, root), Store(root)))
    for case, (data, _, _) in CLASSIFICATION.items():
        root = tmp_path_factory.mktemp(case)
        commands[case] = (root, Command("src.train", _classification_args(suite, data, root), Store(root)))
    results = run_together(*(command for _, command in commands.values()))
    return {
        name: Launched(root, command.store, result)
        for (name, (root, command)), result in zip(commands.items(), results)
    }


@pytest.fixture(scope="module")
def seed_table(suite, first_wave) -> SeedTable:
    """``python -m src.train -cd sweeps -cn seed_table`` (run in the first wave), and src.compare on it."""
    launched = first_wave["seed_table"]
    store, result = launched.store, launched.result
    rows = list(compose_hydra(SWEEPS_DIR, "seed_table").hydra.sweeper.rows)
    table = SeedTable(store, result, rows, _seed_table_common(suite))
    if result.returncode == 0:
        sweep = ["--sweep", table.sweep_id, "--tracking-uri", store.uri]
        table.compare_md, table.compare_json = run_together(
            Command("src.compare", sweep, store, merge=False),
            Command("src.compare", [*sweep, "--format", "json"], store, merge=False),
        )
    return table


def test_seed_table_sweep_as_shipped_finishes_with_exact_counts_and_compares(seed_table, suite):
    assert seed_table.result.returncode == 0, tail(seed_table.result)
    store = seed_table.store
    parents, children = store.split()
    assert len(parents) == 1 and len(children) == 4, tail(seed_table.result)
    parent = parents[0]
    assert parent.info.status == "FINISHED" and metric(parent, "jobs_finished") == 4
    assert [c.info.status for c in children] == ["FINISHED"] * 4, [c.data.tags.get("error") for c in children]
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}
    assert {c.data.tags["sweep_id"] for c in children} == {seed_table.sweep_id}
    assert len({c.data.tags["pid"] for c in children}) == 4, "default isolation: each job in its own process"
    assert sorted(row_key(c) for c in children) == sorted(SEED_TABLE_COUNTS), [row_key(c) for c in children]

    # Trainable parameters, as logged by each run: on the OpenLLaMA-3B architecture the seed table's exact
    # numbers; on the tiny model (dry run) what src.plan counts for each row.
    if not suite.gpu:
        for number, row in enumerate(seed_table.rows):
            (run,) = [c for c in children if job_number(c) == number]
            overrides = [*seed_table.plan_overrides, *shlex.split(row)]
            assert metric(run, "trainable_params") == planned(overrides, SWEEPS_DIR, "seed_table").trainable_params
    else:
        assert {row_key(c): int(metric(c, "trainable_params")) for c in children} == SEED_TABLE_COUNTS
        for run in children:
            assert metric(run, "peak_gpu_mem_gb") > 0 and "gpus" in run.data.tags
            seconds = (run.info.end_time - run.info.start_time) / 1e3
            peak = metric(run, "peak_gpu_mem_gb")
            print(f"{run.info.run_name}: {seconds:.1f} s, peak {peak:.2f} GiB, {run.data.tags['gpus']}")
    for run in children:
        assert metric(run, "eval_loss") > 0 and metric(run, "objective") == metric(run, "eval_loss")
        assert "train_loss" in run.data.metrics

    # src.compare: one table row per job, with the right counts; the best run marked once.
    md = seed_table.compare_md
    assert md is not None and md.returncode == 0, tail(md)
    table = markdown_rows(md.stdout)
    assert sorted(r["run"] for r in table) == sorted(c.info.run_name for c in children), md.stdout
    for run in children:
        (row,) = [r for r in table if r["run"] == run.info.run_name]
        assert row["trainable params (M)"] == format(metric(run, "trainable_params") / 1e6, ".4g"), row
        assert row["status"] == "FINISHED" and row["base bits"] == run.data.params["quant.bits"], row
    assert [r["mark"] for r in table].count("best") == 1, md.stdout
    if suite.gpu:
        assert sorted(r["trainable params (M)"] for r in table) == ["12.99", "12.99", "2.662", "5.325"], md.stdout
    js = seed_table.compare_json
    assert js is not None and js.returncode == 0, tail(js)
    rows = json.loads(js.stdout)["rows"]
    assert sorted(r["run_ids"][0] for r in rows) == sorted(c.info.run_id for c in children)
    for r in rows:
        run = next(c for c in children if c.info.run_id == r["run_ids"][0])
        assert round(r["trainable_params_m"] * 1e6) == metric(run, "trainable_params")
        assert r["bits"] == int(run.data.params["quant.bits"]) and r["status"] == "FINISHED"
    assert sum(r["best"] for r in rows) == 1


# ---------------------------------------------------------------------------------------------
# 4. predict and export from the seed table's best run
# ---------------------------------------------------------------------------------------------


def test_predict_and_export_the_best_seed_table_run(seed_table, suite, tmp_path):
    assert seed_table.result.returncode == 0, tail(seed_table.result)
    js = seed_table.compare_json
    assert js is not None and js.returncode == 0, tail(js)
    (best,) = [r for r in json.loads(js.stdout)["rows"] if r["best"]]
    best_id = best["run_ids"][0]
    store = seed_table.store

    # src.predict from the sweep's best run (as src.compare marks it), rebuilt with the run's own quantization;
    # src.export of the same run (given by id) into an unquantized copy of the base, at the same time.
    prompts = tmp_path / "prompts.jsonl"
    source = (ROOT / "src" / "assets" / "data" / "instructions_validation.jsonl").read_text().splitlines()[:4]
    prompts.write_text("\n".join(source) + "\n")
    out, merged = tmp_path / "predictions.jsonl", tmp_path / "merged"
    predict_args = ["--sweep-best", seed_table.sweep_id, "--input", str(prompts), "--output", str(out)]
    predict_args += ["--max-new-tokens", "8", "--no-progress", "--tracking-uri", store.uri]
    export_args = ["--run", best_id, "--out", str(merged), "--tracking-uri", store.uri]
    predicted, exported = run_together(
        Command("src.predict", predict_args, store), Command("src.export", export_args, store)
    )
    assert predicted.returncode == 0, tail(predicted)
    assert f"best run of sweep {seed_table.sweep_id} is {best_id}" in predicted.stdout, tail(predicted)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["instruction"] for r in records] == [json.loads(line)["instruction"] for line in source]
    assert all(isinstance(r["generation"], str) for r in records)

    # The export: the adapter merged into an unquantized copy of the base (a 4- or 8-bit run is merged too).
    assert exported.returncode == 0, tail(exported)
    files = {p.name for p in merged.iterdir()}
    assert {"config.json", "tokenizer.json", "config.yaml"} <= files and any(f.endswith(".safetensors") for f in files)
    assert not {"adapter_config.json", "adapter_model.safetensors"} & files
    config = json.loads((merged / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["dtype"] == ("bfloat16" if suite.gpu else "float32")  # the run's model.dtype

    # Merged logits against base + adapter unmerged, both computed in float32 on the device.
    compared = subprocess.run(
        [sys.executable, "-c", COMPARE_LOGITS, best_id, store.uri, str(merged), json.dumps(LOGIT_TEXTS)],
        cwd=ROOT,
        env=store.env(),
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    assert compared.returncode == 0, tail(compared)
    stats = json.loads(compared.stdout.strip().splitlines()[-1])
    print(f"merged vs unmerged logits: {stats}")
    # The adapter must move the logits (else the comparison below could not tell a merge from none) ...
    assert stats["adapter_effect"] > 1e-3 * stats["logit_scale"], stats
    if suite.gpu:
        # ... bf16 storage of W + BA rounds each merged weight by up to half a bf16 step (2^-9 relative):
        # logits of order 1 agree to a few 1e-2 (as tests/gpu/test_gpu.py allows for bf16), far closer than
        # the base alone, and the argmax over 32,000 random-weight logits flips only at near-ties.
        assert stats["merge_error"] <= 3e-2 * max(stats["logit_scale"], 1.0), stats
        assert stats["merge_error"] <= 0.1 * stats["adapter_effect"], stats
        assert stats["argmax_agreement"] >= 0.9, stats
    else:
        # float32 throughout: tests/unit/runs/test_export.py's tolerance.
        assert stats["merge_error"] <= 1e-4 * max(stats["logit_scale"], 1.0), stats
        assert stats["argmax_agreement"] == 1.0, stats


# ---------------------------------------------------------------------------------------------
# 2. An Optuna study with a pruner, resumed by the same command
# ---------------------------------------------------------------------------------------------


def _optuna_args(suite: Suite, root: Path) -> list[str]:
    """sweeps/rank_alpha as test 2 runs it (twice: the second run resumes the study)."""
    store = Store(root)
    return [
        "-cd",
        str(SWEEPS_DIR),
        "-cn",
        "rank_alpha",
        *suite.model("qwen"),
        *suite.train,
        "data=instructions",
        "data.subsample=32",
        "data.eval_subsample=8",
        "data.num_sample_prompts=0",
        "tracking.log_adapter=false",
        "train.max_steps=choice(2,4)",
        "train.eval_strategy=steps",
        "train.eval_steps=1",
        "hydra.sweeper.n_trials=4",
        "hydra.sweeper.sampler.seed=0",
        f"hydra.sweeper.storage={store.optuna}",
        "hydra.sweeper.pruner._target_=optuna.pruners.ThresholdPruner",
        "+hydra.sweeper.pruner.upper=0.0",
        "+hydra.sweeper.pruner.n_warmup_steps=2",
        f"hydra.sweep.dir={root / 'multirun'}",
    ]


def test_optuna_study_prunes_and_resumes_without_duplicates(suite, first_wave):
    """sweeps/rank_alpha.yaml (TPE over preset, 4/8-bit, r, alpha ratio, dropout, lr) on the Qwen2.5-0.5B shape.

    Pruning is made certain, not left to the values of random-weight models: a ThresholdPruner that
    prunes any reported eval_loss (> 0) from step 2, and train.max_steps in the search space. A trial
    of 2 steps reports only step 1 (the last step's evaluation is never reported) and completes; one of
    4 steps is pruned at step 2. With the seeded sampler the four trials hold both.
    """
    import mlflow
    import optuna
    from optuna.trial import TrialState

    from src.sweeps.study import counted

    launched = first_wave["optuna"]
    store, first = launched.store, launched.result
    args = _optuna_args(suite, launched.root)
    assert first.returncode == 0, tail(first)
    (summary,) = optuna.get_all_study_summaries(store.optuna)
    study = optuna.load_study(study_name=summary.study_name, storage=store.optuna)
    trials = [t for t in study.get_trials() if counted(t)]
    states = {t.number: t.state for t in trials}
    assert len(trials) == 4, [(t.number, t.state, t.params) for t in study.get_trials()]
    print(
        "trials:",
        [(t.number, t.state.name, t.params["train.max_steps"], t.params["quant"], t.duration) for t in trials],
    )
    pruned = [t for t in trials if t.state == TrialState.PRUNED]
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert pruned and complete and len(pruned) + len(complete) == 4, [(t.number, t.state, t.params) for t in trials]
    assert {t.params["train.max_steps"] for t in pruned} == {4}
    assert {t.params["train.max_steps"] for t in complete} == {2}
    assert all(2 in t.intermediate_values for t in pruned), [t.intermediate_values for t in pruned]
    assert {t.params["quant"] for t in trials} <= {"4bit", "8bit"}

    parents, children = store.split()
    assert len(parents) == 1 and parents[0].info.status == "FINISHED" and len(children) == 4
    by_trial = {c.data.tags["optuna_trial"]: c for c in children}
    assert sorted(by_trial) == sorted(str(t.number) for t in trials)
    for trial in pruned:
        run = by_trial[str(trial.number)]
        assert run.info.status == "KILLED" and run.data.tags["status"] == "PRUNED", run.data.tags
    for trial in complete:
        run = by_trial[str(trial.number)]
        assert run.info.status == "FINISHED" and metric(run, "objective") == pytest.approx(trial.value)
        assert run.data.params["quant.bits"] == trial.params["quant"].removesuffix("bit")
    for trial in trials:  # each run trained its trial's params, with alpha derived from the ratio
        params = by_trial[str(trial.number)].data.params
        assert params["lora.r"] == str(trial.params["lora.r"]) and params["lora.preset"] == trial.params["lora"]
        assert float(params["lora.alpha"]) == trial.params["lora.alpha_ratio"] * trial.params["lora.r"]

    # The identical command again: the study is resumed, n_trials counts every trial, nothing trains twice.
    second = cli("src.train", args, store)
    assert second.returncode == 0, tail(second)
    assert f"{summary.study_name}] Optuna study in {store.optuna}: 4/4 trials done" in second.stdout, tail(second)
    again = optuna.load_study(study_name=summary.study_name, storage=store.optuna).get_trials()
    assert {t.number: t.state for t in again if counted(t)} == states
    assert not [t for t in again if t.state == TrialState.COMPLETE and t.number not in states]
    assert len({json.dumps(t.params, sort_keys=True) for t in again if counted(t)}) == 4
    parents_after, children_after = store.split()
    assert [p.info.run_id for p in parents_after] == [parents[0].info.run_id]  # the same parent, resumed
    assert sorted(c.info.run_id for c in children_after) == sorted(c.info.run_id for c in children)
    assert mlflow.MlflowClient(store.uri).get_run(parents[0].info.run_id).info.status == "FINISHED"


# ---------------------------------------------------------------------------------------------
# 3. Classification on a 4-bit base: single-label with class weights, multi-label with pos_weight
# ---------------------------------------------------------------------------------------------

CLASSIFICATION = {
    "single_label_balanced": (
        ["data=topics", "data.class_weights=balanced"],
        ["eval_accuracy", "eval_balanced_accuracy", "eval_mcc", "eval_f1_macro", "eval_f1_weighted"],
        "eval_f1_macro",
    ),
    "multi_label_pos_weight_auto": (
        ["data=topics_multilabel", "data.pos_weight=auto"],
        ["eval_f1_micro", "eval_f1_macro", "eval_f1_samples", "eval_subset_accuracy"],
        "eval_f1_micro",
    ),
}


def _classification_args(suite: Suite, data: list[str], root: Path) -> list[str]:
    return [
        *suite.model("qwen"),
        "quant=4bit",
        "lora=attn_qv",
        *data,
        *suite.train,
        "data.subsample=96",
        "data.eval_subsample=48",
        "train.max_steps=6",
        "train.eval_strategy=steps",
        "train.eval_steps=3",
        f"hydra.run.dir={root / 'out'}",
    ]


@pytest.mark.parametrize("case", sorted(CLASSIFICATION))
def test_classification_on_a_4bit_base(case, first_wave, suite):
    import mlflow

    data, expected, objective = CLASSIFICATION[case]
    launched = first_wave[case]
    store, out, result = launched.store, launched.root / "out", launched.result
    assert result.returncode == 0, tail(result)
    (run,) = store.runs()
    assert run.info.status == "FINISHED", run.data.tags
    params = run.data.params
    assert params["quant.bits"] == "4" and params["data.task"] in ("classification", "multilabel")
    assert params[data[1].split("=")[0]] == data[1].split("=")[1]
    for name in expected:
        assert 0.0 <= metric(run, name) <= 1.0 or name == "eval_mcc", name
    assert metric(run, "objective") == metric(run, objective)
    history = mlflow.MlflowClient(store.uri).get_metric_history(run.info.run_id, objective)
    assert sorted({m.step for m in history}) == [3, 6], history  # the mid-run evaluation and the last
    labels = json.loads((out / "adapter" / "label_map.json").read_text())["labels"]
    prefix = "eval_f1_class_" if "class_weights" in data[1] else "eval_f1_label_"
    assert all(f"{prefix}{label}" in run.data.metrics for label in labels), sorted(run.data.metrics)
    artifacts = {a.path for a in mlflow.MlflowClient(store.uri).list_artifacts(run.info.run_id)}
    assert {"adapter", "classification_report.json", "config.yaml"} <= artifacts
    if suite.gpu:
        assert metric(run, "peak_gpu_mem_gb") > 0 and "gpus" in run.data.tags


# ---------------------------------------------------------------------------------------------
# 5. Faults: a trial killed with SIGTERM, a trial out of memory
# ---------------------------------------------------------------------------------------------


def _small_classifier(suite: Suite) -> list[str]:
    return [
        *suite.model("qwen"),
        "quant=none",
        "data=topics",
        *suite.train,
        "data.subsample=64",
        "data.eval_subsample=16",
        "train.eval_strategy=no",
        "tracking.log_adapter=false",
    ]


def test_sigterm_to_one_trial_ends_it_killed_and_the_sweep_goes_on(suite, tmp_path, capped_sweep):
    """A grid of 2: job 0 would train for 100,000 steps, job 1 for 3. SIGTERM reaches job 0's trial process
    (found by its run's pid tag, checked to be a descendant of the sweeper and not the sweeper itself).
    Test 6's sweep (``capped_sweep``) runs beside it, in its own store."""
    store = Store(tmp_path)
    args = ["--multirun", "train.max_steps=100000,3", *_small_classifier(suite)]
    args.append(f"hydra.sweep.dir={tmp_path / 'multirun'}")
    log = tmp_path / "sweep.log"
    with open(log, "w") as out:
        sweeper = subprocess.Popen(
            [sys.executable, "-m", "src.train", *args], cwd=ROOT, env=store.env(), stdout=out, stderr=subprocess.STDOUT
        )
    try:

        def training_run():
            try:
                _, children = store.split()
            except Exception as exc:  # the trial writes a metric every step; a read may meet SQLite's lock
                if "locked" in str(exc):
                    return None
                raise
            return next((c for c in children if c.info.status == "RUNNING" and "train_loss" in c.data.metrics), None)

        victim = wait_for(training_run, sweeper, log, TIMEOUT_S, "job 0 logging a training loss")
        pid = int(victim.data.tags["pid"])
        assert pid != sweeper.pid and pid in descendants(sweeper.pid), (pid, sweeper.pid, descendants(sweeper.pid))
        os.kill(pid, signal.SIGTERM)
        code = sweeper.wait(timeout=TIMEOUT_S)
    finally:
        sweeper.kill()
    output = log.read_text()
    assert code == 1, f"the sweep must end saying that a job failed (exit {code}):\n{output[-TAIL:]}"
    assert "FAILED #0" in output and "Terminated" in output, output[-TAIL:]
    parents, children = store.split()
    assert len(parents) == 1 and parents[0].info.status == "FINISHED" and len(children) == 2
    killed, finished = sorted(children, key=lambda c: int(c.data.params["train.max_steps"]), reverse=True)
    assert killed.info.run_id == victim.info.run_id
    assert killed.info.status == "KILLED" and killed.data.tags["error_type"] == "Terminated", killed.data.tags
    assert finished.info.status == "FINISHED" and finished.data.params["train.max_steps"] == "3"
    assert "objective" in finished.data.metrics
    assert finished.info.start_time >= killed.info.end_time  # the sweep went on after the kill
    import psutil

    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


# ---------------------------------------------------------------------------------------------
# 6. Feasibility: a job over a memory cap is shrunk (or skipped), and its measured peak stays under the cap
# ---------------------------------------------------------------------------------------------


@dataclass
class Capped:
    """Test 6's sweep, started in the background while test 5 runs (see :func:`capped_sweep`)."""

    store: Store
    batch: int
    estimate: dict[int, float]
    cap: float
    started: Started


@pytest.fixture(scope="module")
def capped_sweep(suite, tmp_path_factory):
    """Test 6's sweep, started when test 5 (SIGTERM) asks for it and waited for in test 6: the two share the
    GPU, each needing a few GiB. Its memory cap is given (``available_gpu_mem_gb``), so what else runs on the
    GPU does not change what it is allowed.
    """
    root = tmp_path_factory.mktemp("capped")
    store = Store(root)
    batch = 16
    length = 512 if suite.gpu else MAX_LENGTH
    body = f"data:\n  text_template: {json.dumps(long_rows(length))}\n"
    rows = ["tracking.run_name=shrunk", "hydra.sweeper.feasibility.mode=skip"]
    config_dir = write_sweep(root / "conf", "capped", rows, body)
    common = [
        *_small_classifier(suite),
        f"model.max_length={length}",
        "train.fast_path=false",  # the padded path's batch is what the check shrinks; the packed one gets a budget
        "train.gradient_accumulation_steps=1",
        "train.activation_checkpointing=false",
        "train.max_steps=2",
    ]
    estimate = {
        b: planned([*common, f"train.per_device_train_batch_size={b}"], config_dir, "capped").est_peak_gpu_mem_gb
        for b in (batch, batch // 2)
    }
    cap = round((estimate[batch] + estimate[batch // 2]) / 2, 3)
    assert estimate[batch // 2] < cap < estimate[batch], estimate
    args = [
        "-cd",
        str(config_dir),
        "-cn",
        "capped",
        *common,
        f"train.per_device_train_batch_size={batch}",
        f"hydra.sweeper.feasibility.available_gpu_mem_gb={cap}",
        f"hydra.sweep.dir={root / 'multirun'}",
    ]
    capped = Capped(store, batch, estimate, cap, Started(Command("src.train", args, store)))
    yield capped
    capped.started.close()


def test_a_job_over_the_memory_cap_is_shrunk_or_skipped(suite, capped_sweep):
    """Rows of one config whose micro-batch of 16 does not fit the cap and 8 does: shrunk (16 x 1 -> 8 x 2),
    and skipped with the reason in mode skip. Every row is model.max_length tokens long (the text repeated,
    truncated), as src.plan assumes, so the measured peak is close to the estimate and the cap means what it says.
    """
    store, batch, estimate, cap = capped_sweep.store, capped_sweep.batch, capped_sweep.estimate, capped_sweep.cap
    result = capped_sweep.started.wait()
    assert result.returncode == 0, tail(result)
    shrunk = f"micro-batch {batch} -> {batch // 2}, gradient accumulation 1 -> 2 to fit {cap:.2f} GiB free"
    assert shrunk in result.stdout, tail(result)
    skipped = f"needs ~{estimate[batch]:.2f} GiB of GPU memory, {cap:.2f} GiB free"
    assert "SKIPPED #1" in result.stdout and skipped in result.stdout, tail(result)
    parents, children = store.split()
    assert len(parents) == 1 and metric(parents[0], "jobs_skipped") == 1 and metric(parents[0], "jobs_finished") == 1
    (run,) = children  # the skipped row never started a run
    assert run.info.status == "FINISHED" and run.info.run_name == "shrunk"
    params = run.data.params
    micro, accum = int(params["train.per_device_train_batch_size"]), int(params["train.gradient_accumulation_steps"])
    assert (micro, accum) == (batch // 2, 2) and micro * accum == batch
    assert run.data.tags["feasibility"] == shrunk
    if suite.gpu:
        peak = metric(run, "peak_gpu_mem_gb")
        print(f"estimates {estimate} GiB, cap {cap} GiB, measured peak at micro-batch {micro}: {peak:.3f} GiB")
        assert peak < cap, (peak, cap, estimate)
        assert peak > 0.4 * estimate[batch // 2], (peak, estimate)  # the rows did fill the micro-batch


# ---------------------------------------------------------------------------------------------
# 5b. Out of memory: last, with the GPU to itself
# ---------------------------------------------------------------------------------------------


def test_oom_trial_fails_and_the_next_starts_at_clean_gpu_memory(suite, tmp_path):
    """Rows: A (r=8), B (r=16, out of memory at its second step), A again. B ends FAILED with OutOfMemoryError;
    the second A's measured peak (torch.cuda.max_memory_allocated in its own process) equals the first A's,
    which ran before any OOM. Memory that B held, in a process that trained on or through one that lingered,
    would show there or in nvidia-smi; in one process for all jobs the peak would be B's, the whole GPU.

    On the GPU B really runs the device out of memory (tests/fault_injection's ``fill_gpu``: 1 GiB blocks
    until the allocator fails, held while the error unwinds); on CPU its ``oom`` raises the same error at the
    same step.
    """
    store = Store(tmp_path)
    fault = "fill_gpu:16" if suite.gpu else "oom:16"
    env = {"PYTHONPATH": f"{FAULTS_DIR}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "LORA_SWEEPS_TEST_FAULT": fault}
    config_dir = write_sweep(tmp_path / "conf", "oom_rows", ["lora.r=8", "lora.r=16", "lora.r=8"])
    args = [
        "-cd",
        str(config_dir),
        "-cn",
        "oom_rows",
        *_small_classifier(suite),
        "train.max_steps=3",
        f"hydra.sweep.dir={tmp_path / 'multirun'}",
    ]
    result = cli("src.train", args, store, env=env)
    assert result.returncode == 1, tail(result)
    assert "FAILED #1" in result.stdout and "OutOfMemoryError" in result.stdout, tail(result)
    parents, children = store.split()
    assert len(parents) == 1 and len(children) == 3, tail(result)
    first, oomed, second = sorted(children, key=job_number)
    assert oomed.info.status == "FAILED" and oomed.data.tags["error_type"] == "OutOfMemoryError", oomed.data.tags
    assert oomed.data.params["lora.r"] == "16" and "train_loss" in oomed.data.metrics  # it trained a step first
    assert first.info.status == second.info.status == "FINISHED"
    pids = {c.data.tags["pid"] for c in children}
    assert len(pids) == 3 and str(os.getpid()) not in pids, "each job in its own process"
    assert metric(first, "trainable_params") == metric(second, "trainable_params")  # the same config twice
    if not suite.gpu:  # float32 on CPU is deterministic: the run after the OOM is the run before it
        assert metric(first, "objective") == pytest.approx(metric(second, "objective"), abs=1e-6)
    if suite.gpu:
        assert "CUDA out of memory" in oomed.data.tags["error"], oomed.data.tags["error"]
        (held,) = [int(n) for n in re.findall(r"fault: held (\d+) GiB of GPU memory", result.stdout)]
        before, after = metric(first, "peak_gpu_mem_gb"), metric(second, "peak_gpu_mem_gb")
        print(f"B held {held} GiB when CUDA ran out; peak GiB of A before the OOM {before:.3f}, after it {after:.3f}")
        assert after == pytest.approx(before, rel=0.02, abs=0.05), (before, after)
        smi = shutil.which("nvidia-smi")
        if smi:  # once the sweep is over, nothing holds GPU memory (this process never starts CUDA)
            query = [smi, "--query-gpu=memory.used,memory.total", "--format=csv,noheader,nounits"]
            shown = subprocess.run(query, capture_output=True, text=True, timeout=60).stdout
            used_mib, total_mib = (float(x) for x in shown.splitlines()[0].split(","))
            assert held >= 0.8 * total_mib / 1024, (held, shown)  # B did fill the GPU
            assert used_mib < 2048, shown
            assert after < 0.25 * total_mib / 1024, (after, shown)


# ---------------------------------------------------------------------------------------------
# Packed trials (hydra.sweeper.pack, issues 19 and 30)
# ---------------------------------------------------------------------------------------------


def _packed_grid(suite, tmp_path, data: list[str], pack: int) -> tuple[str, list]:
    """A grid of 4 trials (r 4/8 x q,v / all linear) on a 4-bit base with ``hydra.sweeper.pack=pack``: one pack
    process, each trial FINISHED in its own child run with its own exact trainable count and its adapter. Returns the
    sweep's output and the trials' runs."""
    store = Store(tmp_path)
    common = [
        *suite.model("qwen"),
        *suite.train,
        "quant=4bit",
        *data,
        "data.subsample=64",
        "data.eval_subsample=16",
        "train.max_steps=4",
        "train.save_strategy=no",
    ]
    args = ["--multirun", "lora.r=4,8", "lora=attn_qv,all_linear", f"hydra.sweeper.pack={pack}", *common]
    result = cli("src.train", [*args, f"hydra.sweep.dir={tmp_path / 'multirun'}"], store)
    assert result.returncode == 0, tail(result)
    output = result.stdout  # stderr merged into it
    launch = f"4 jobs as 1 launches (hydra.sweeper.pack={pack}: 1 pack processes, each training {pack} at a time)"
    assert launch in output
    parents, jobs = store.split()
    assert len(parents) == 1 and len(jobs) == 4
    assert {j.info.status for j in jobs} == {"FINISHED"}
    assert sorted(j.data.tags["pack_trial"] for j in jobs) == ["t0", "t1", "t2", "t3"]
    for job in jobs:
        overrides = [*common, f"lora={job.data.params['lora.preset']}", f"lora.r={job.data.params['lora.r']}"]
        assert metric(job, "trainable_params") == planned(overrides, ROOT / "conf", "config").trainable_params
        assert Path(job.data.tags["output_dir"], "adapter", "adapter_model.safetensors").is_file()
    return output, jobs


def test_a_packed_grid_trains_every_trial_on_one_base(suite, tmp_path):
    """An SFT grid of 4 as one pack of 4 (varlen attention on the GPU, one joint step for all)."""
    _, jobs = _packed_grid(suite, tmp_path, ["data=instructions", "data.num_sample_prompts=1"], pack=4)
    for job in jobs:
        assert metric(job, "eval_loss") > 0


def test_a_packed_classification_grid_refills_its_slots(suite, tmp_path):
    """A multi-label grid of 4 (pos_weight) in 2 slots: one pack process trains all 4, the last two in the slots the
    first two free; each trial's trainable count takes in its head."""
    output, jobs = _packed_grid(suite, tmp_path, ["data=topics_multilabel"], pack=2)
    assert "pack: trained 4 trial(s) in 2 slot(s) on one base" in output
    for job in jobs:
        assert 0.0 <= metric(job, "eval_f1_macro") <= 1.0


def test_a_pruned_packed_study_refills_the_slots_of_its_pruned_trials(suite, tmp_path):
    """6 Optuna trials in 3 slots, pruning made certain: a ThresholdPruner prunes every evaluation from step 2, and
    ``train.max_steps`` is in the space (2: the trial completes, its step-2 evaluation never reported; 4: pruned at
    step 2). Pack processes of 3 slots train all 6 (one, unless the sampler repeats a proposal, which is asked again);
    the counts match the sampled max_steps exactly."""
    import optuna
    from optuna.trial import TrialState

    store = Store(tmp_path)
    args = [
        "--multirun",
        "hydra/sweeper=lora_optuna",
        *suite.model("qwen"),
        *suite.train,
        "quant=4bit",
        "data=instructions",
        "data.subsample=64",
        "data.eval_subsample=16",
        "data.num_sample_prompts=0",
        "train.eval_strategy=steps",
        "train.eval_steps=2",
        "train.save_strategy=no",
        "tracking.log_adapter=false",
        "lora.r=choice(4,8,16)",
        "train.learning_rate=choice(1e-4,3e-4,1e-3)",
        "train.max_steps=choice(2,4)",
        "hydra.sweeper.n_trials=6",
        "hydra.sweeper.pack=3",
        "hydra.sweeper.sampler.seed=0",
        f"hydra.sweeper.storage={store.optuna}",
        "hydra.sweeper.study_name=packed",
        "hydra.sweeper.pruner._target_=optuna.pruners.ThresholdPruner",
        "+hydra.sweeper.pruner.upper=0.0",
        "+hydra.sweeper.pruner.n_warmup_steps=2",
        f"hydra.sweep.dir={tmp_path / 'multirun'}",
    ]
    result = cli("src.train", args, store)
    assert result.returncode == 0, tail(result)
    output = result.stdout  # stderr merged into it
    trained = re.findall(r"pack: trained (\d+) trial\(s\) in 3 slot\(s\) on one base", output)
    assert sum(map(int, trained)) == 6 and 1 <= len(trained) <= 2, output[-6000:]  # a repeated proposal is re-asked
    trials = optuna.load_study(study_name="packed", storage=store.optuna).get_trials()
    assert len(trials) == 6
    for trial in trials:
        expected = TrialState.PRUNED if trial.params["train.max_steps"] == 4 else TrialState.COMPLETE
        assert trial.state == expected, (trial.number, trial.state, trial.params)
    _, jobs = store.split()
    assert len(jobs) == 6
    by_trial = {int(j.data.tags["optuna_trial"]): j for j in jobs}
    for trial in trials:
        status = "KILLED" if trial.state == TrialState.PRUNED else "FINISHED"
        assert by_trial[trial.number].info.status == status


def test_an_lr_rank_study_in_packs_reports_each_rank_s_best_learning_rate(suite, tmp_path):
    """sweeps/lr_rank.yaml (the learning rate on a log scale with rank, targets and rsLoRA) on the GPU: 4 trials,
    2 at a time in one pack. Every trial FINISHED with its exact trainable count; the parent run holds each rank's
    best learning rate (table and plot, one metric a rank), the param importances, and the trials' GPU use."""
    import mlflow

    store = Store(tmp_path)
    common = [*suite.model("qwen"), *suite.train, "quant=4bit", "data=instructions", "data.num_sample_prompts=0"]
    common += ["data.subsample=64", "data.eval_subsample=16"]
    args = [
        "-cd",
        str(SWEEPS_DIR),
        "-cn",
        "lr_rank",
        *common,
        "train.max_steps=4",
        "train.save_strategy=no",
        "hydra.sweeper.n_trials=4",
        "hydra.sweeper.pack=2",
        "hydra.sweeper.sampler.seed=0",
        f"hydra.sweeper.storage={store.optuna}",
        f"hydra.sweep.dir={tmp_path / 'multirun'}",
    ]
    # trials of a few seconds: a GPU sample a second, where MLflow's default is one each 10 s
    result = cli("src.train", args, store, env={"MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "1"})
    assert result.returncode == 0, tail(result)
    output = result.stdout
    assert "best learning rate by rank: r=" in output and "importance: " in output, output[-4000:]
    print(re.findall(r".*(?:best learning rate by rank|importance): .*", output))
    (parent,), jobs = store.split()
    assert len(jobs) == 4 and {j.info.status for j in jobs} == {"FINISHED"}
    assert {j.data.tags["pack_size"] for j in jobs} == {"2"}
    for job in jobs:
        params = job.data.params
        overrides = [*common, f"lora={params['lora.preset']}", f"lora.r={params['lora.r']}"]
        overrides.append(f"lora.use_rslora={params['lora.use_rslora']}")
        assert metric(job, "trainable_params") == planned(overrides, SWEEPS_DIR, "lr_rank").trainable_params
        print(job.data.params["lora.r"], job.data.params["train.learning_rate"], job.data.metrics.get("eval_loss"))
    ranks = {int(j.data.params["lora.r"]) for j in jobs}
    assert {f"best_lr/r{r}" for r in ranks} <= set(parent.data.metrics), parent.data.metrics
    client = mlflow.MlflowClient(store.uri)
    files = {a.path for a in client.list_artifacts(parent.info.run_id)}
    files |= {a.path for a in client.list_artifacts(parent.info.run_id, "plots")}
    assert {"best_lr_by_rank.md", "importance.md", "plots/lr_by_rank.png"} <= files, files
    print("system metrics of one trial:", sorted(k for k in jobs[0].data.metrics if k.startswith("system/")))
    if suite.gpu:  # tracking.system_metrics is on by default on a GPU only
        from src.runs.gpu_use import gpu_utilization

        used = {j.info.run_id: gpu_utilization(client, j) for j in jobs}
        print("GPU util % by trial (src.compare's column):", used)
        assert all(value is not None and 0 <= value <= 100 for value in used.values()), "nvidia-ml-py there?"
