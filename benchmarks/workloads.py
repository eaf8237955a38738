"""The bench's workloads (architectures, base bits, row lengths, the classifiers' seed recipes), their synthetic rows
and random-weight checkpoints, and the measured matmul rate that MFU divides by."""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

from benchmarks.common import Workload, bench_tokenizer

W3B = dict(
    hidden_size=3200, intermediate_size=8640, num_hidden_layers=26, num_attention_heads=32, num_key_value_heads=32
)
MISTRAL7B = dict(
    hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8
)
BERT_LARGE = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16)
TINY = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
TINY_BERT = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4)


# The classifiers' recipes, as project overrides (the experiment files encode the tutorials' settings). The labels
# come from the bench, not from a data file: seed 000's six label columns, seed 001's five classes.
SEED000 = ("experiment=seed000_mistral7b_multilabel", "data.path=synthetic.csv")
SEED001 = ("experiment=seed001_bert_large_intents", "data.labels=[c0,c1,c2,c3,c4]")
SHORT_TEXTS = ("lora=all_linear", "data=topics", "data.labels=[negative,positive]", "train=gpu")  # the seeds' QLoRA
GPU_PRECISION = (("bf16", True), ("tf32", True))  # conf/train/gpu.yaml's (seeds 000 and 001 train in fp32)


WORKLOADS = {
    w.name: w
    for w in (
        Workload("w3b-4bit", "openllama3b", "llama", W3B, 4),
        Workload("w3b-8bit", "openllama3b", "llama", W3B, 8),
        # quant=fp8 (src/fp8.py) on the fast side; the seed side is the seeds' 8-bit recipe, LLM.int8
        Workload("w3b-fp8", "openllama3b", "llama", W3B, 8, quant="fp8"),
        Workload("w3b-16bit", "openllama3b", "llama", W3B, 16),
        Workload("mistral7b-4bit", "mistral7b", "mistral", MISTRAL7B, 4),
        Workload("tiny", "tiny", "llama", TINY, 16, lengths=(16, 64), vocab_size=1024),
        # Classifiers (benchmarks/classification.py): seed 000's multi-label recipe on title + abstract lengths,
        # short single sentences (SST-2, TREC) on the seeds' QLoRA recipe, seed 001's BERT on spoken commands.
        Workload(
            "mistral7b-4bit-multilabel",
            "mistral7b",
            "mistral",
            MISTRAL7B,
            4,
            lengths=(150, 350),
            task="multilabel",
            recipe=SEED000,
            fast=GPU_PRECISION,
            seed_targets=("q_proj", "k_proj", "v_proj", "o_proj"),
        ),
        Workload(
            "w3b-4bit-cls-short",
            "openllama3b",
            "llama",
            W3B,
            4,
            lengths=(10, 60),
            task="classification",
            recipe=("model=openllama3b", *SHORT_TEXTS),
        ),
        Workload(
            "bert-large-4bit-cls",
            "bert_large",
            "bert",
            BERT_LARGE,
            4,
            lengths=(6, 24),
            vocab_size=30522,
            task="classification",
            recipe=SEED001,
            fast=GPU_PRECISION,
        ),
        # Their CPU smoke tests: the same recipes on 2-layer models.
        Workload(
            "tiny-cls",
            "tiny",
            "llama",
            TINY,
            4,
            lengths=(4, 24),
            vocab_size=1024,
            task="classification",
            recipe=("model=tiny", *SHORT_TEXTS),
        ),
        Workload(
            "tiny-multilabel",
            "tiny",
            "llama",
            TINY,
            4,
            lengths=(8, 32),
            vocab_size=1024,
            task="multilabel",
            recipe=(*SEED000, "model=tiny"),
            fast=GPU_PRECISION,
            seed_targets=("q_proj", "k_proj", "v_proj", "o_proj"),
        ),
        Workload(
            "tiny-bert-cls",
            "bert_large",
            "bert",
            TINY_BERT,
            4,
            lengths=(4, 24),
            vocab_size=1024,
            task="classification",
            recipe=SEED001,
            fast=GPU_PRECISION,
        ),
    )
}


# ---------------------------------------------------------------------------------------------- data and model


def synthetic_examples(n: int, lengths: tuple[int, int], vocab_size: int, seed: int = 0) -> list[list[int]]:
    """``n`` rows of random token ids (3..vocab), lengths uniform in ``lengths`` (inclusive)."""
    generator = torch.Generator().manual_seed(seed)
    sizes = torch.randint(lengths[0], lengths[1] + 1, (n,), generator=generator).tolist()
    return [torch.randint(3, vocab_size, (size,), generator=generator).tolist() for size in sizes]


def model_config(workload: Workload):
    from transformers import BertConfig, LlamaConfig, MistralConfig

    if workload.model_type == "bert":
        return BertConfig(vocab_size=workload.vocab_size, max_position_embeddings=512, **workload.arch)
    cls = {"llama": LlamaConfig, "mistral": MistralConfig}[workload.model_type]
    return cls(
        vocab_size=workload.vocab_size,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        **workload.arch,
    )


def ensure_checkpoint(workload: Workload, root: Path, device: str) -> Path:
    """A random-weight bf16 checkpoint of the architecture (seeded), saved once and reused (an encoder: its bare
    ``BertModel``, from which the classifier loads with a new head)."""
    from transformers import AutoModel, AutoModelForCausalLM

    directory = root / f"{workload.model_type}-{workload.arch['hidden_size']}-{workload.arch['num_hidden_layers']}"
    if (directory / "DONE").exists():
        return directory
    torch.manual_seed(0)
    builder = AutoModel if workload.model_type == "bert" else AutoModelForCausalLM
    with torch.device(device):
        model = builder.from_config(model_config(workload), dtype=torch.bfloat16)
    model.save_pretrained(directory)
    bench_tokenizer().save_pretrained(directory)
    (directory / "DONE").write_text("1")
    del model
    return directory


def non_embedding_params(workload: Workload) -> int:
    """Parameters that do matmul work per token: all but the input embedding (lm_head counts). A classifier's:
    the linear layers of its transformer (its head runs on one pooled token an example)."""
    from transformers import AutoModel, AutoModelForCausalLM

    if workload.task != "sft":
        with torch.device("meta"):
            backbone = AutoModel.from_config(model_config(workload))
        return sum(m.weight.numel() for m in backbone.modules() if isinstance(m, torch.nn.Linear))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config(workload))
    return sum(p.numel() for p in model.parameters()) - model.get_input_embeddings().weight.numel()


def all_params(workload: Workload) -> int:
    """Every parameter of the architecture, embeddings included: the N of "4N TF/s" (4 x N x tokens/s), the figure
    other LoRA tools report, which compares across tools without a measured peak."""
    from transformers import AutoModel, AutoModelForCausalLM

    builder = AutoModel if workload.model_type == "bert" else AutoModelForCausalLM
    with torch.device("meta"):
        model = builder.from_config(model_config(workload))
    return sum(p.numel() for p in model.parameters())


def bf16_matmul_tflops(device: str) -> float:
    """The measured dense matmul rate: bf16 8192^3 on CUDA (median of 10), fp32 on CPU."""
    if device == "cpu":
        a = torch.randn(1024, 1024)
        start = time.perf_counter()
        for _ in range(5):
            a @ a
        return 5 * 2 * 1024**3 / (time.perf_counter() - start) / 1e12
    n = 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del a, b
    torch.cuda.empty_cache()
    return 2 * n**3 / statistics.median(times) / 1e12


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": sys.version.split()[0], "cuda": str(torch.version.cuda)}
    for name in ("torch", "transformers", "peft", "trl", "accelerate", "bitsandbytes", "datasets", "liger-kernel"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out
