"""The embedded default model: a tiny Llama built deterministically, with no download.

``model=tiny`` points at ``builtin:tiny-llama``. On first use this module trains a small
byte-level BPE tokenizer on the bundled datasets, builds a Llama from a fixed seed and
pretrains it briefly (full weights, next-token loss) on the bundled plain sentences, so that
LoRA has a language model to adapt rather than noise; then it saves both under
``.cache/tiny-llama`` in the project root. The instruction data is left out of pretraining:
teaching that format is the SFT run's job. Every later
load reads that directory like any local checkpoint, so the loading code is the same as for
a hub model. Like Llama, the tokenizer has no pad token: the training code must set one. It has a
small chat template (``<|user|>`` / ``<|assistant|>`` lines) for ``data.format=messages``.

Run ``python -m src.tiny [OUT_DIR]`` to write it somewhere else.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path
from typing import Optional

from src.bundled import DATA_DIR
from src.logger import say
from src.paths import PROJECT_ROOT

BUILTIN_PREFIX = "builtin:"
BUILTINS = {"tiny-llama": PROJECT_ROOT / ".cache" / "tiny-llama"}
# Bump when the recipe below changes, so stale caches are rebuilt rather than reused.
RECIPE_VERSION = 5
PRETRAIN_STEPS = 80
PRETRAIN_BATCH = 32

VOCAB_SIZE = 1024
# A small chat template for data.format=messages: "<|role|>" lines, each assistant turn ended by EOS. The role
# markers are plain text, not added tokens, so the vocabulary, the weights and the pinned losses stay as they were.
# Newlines are Jinja expressions: transformers renders with trim_blocks, which drops a newline after a tag.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|' + message['role'] + '|>\\n' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)
ARCH = {
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
}


# The tokenizer's and pretraining's corpus: the bundled sets it was first built from, named so that a set added
# later (seed 001's intents) leaves the tiny model, and the losses pinned in tests/regression/test_pinned_loss.py,
# as they were.
CORPUS_FILES = ("instructions_train.jsonl", "topics_multilabel_train.csv", "topics_train.csv")


def _corpus() -> list[str]:
    texts: list[str] = []
    for path in (DATA_DIR / name for name in CORPUS_FILES):
        if path.suffix == ".csv":
            with path.open(encoding="utf-8") as f:
                texts.extend(row["text"] for row in csv.DictReader(f))
        else:
            with path.open(encoding="utf-8") as f:
                for line in f:
                    row = json.loads(line)
                    texts.append(" ".join(str(v) for k, v in row.items() if k != "id"))
    # Alpaca template words, so prompts tokenize into few pieces.
    texts.append("Below is an instruction that describes a task. ### Instruction: ### Input: ### Response:")
    return texts


def build_tokenizer():
    """Train a byte-level BPE tokenizer (bos/eos/unk, no pad) on the bundled training text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", model_max_length=512
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def pretrain(model, tokenizer, steps: int = PRETRAIN_STEPS) -> list[float]:
    """A few hundred seeded AdamW steps of next-token prediction on the bundled sentences."""
    import random

    import torch

    texts = [t for path in sorted(DATA_DIR.glob("topics*_train.csv")) for t in _csv_texts(path)]
    rng = random.Random(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / steps)
    pad_id = tokenizer.eos_token_id
    losses = []
    model.train()
    for _ in range(steps):
        batch = rng.sample(texts, PRETRAIN_BATCH)
        ids = [tokenizer(t)["input_ids"] + [tokenizer.eos_token_id] for t in batch]
        width = max(map(len, ids))
        input_ids = torch.tensor([x + [pad_id] * (width - len(x)) for x in ids])
        mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids])
        labels = input_ids.masked_fill(mask == 0, -100)
        loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    model.eval()
    return losses


def _csv_texts(path: Path) -> list[str]:
    with path.open(encoding="utf-8") as f:
        return [row["text"] for row in csv.DictReader(f)]


def build(out_dir: Path) -> Path:
    """Write the tiny tokenizer and a seeded random-weight LlamaForCausalLM to ``out_dir``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
        **ARCH,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    pretrain(model, tokenizer)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    (out_dir / "RECIPE_VERSION").write_text(str(RECIPE_VERSION))
    return out_dir


def resolve_builtin(name_or_path: str) -> str:
    """Map ``builtin:NAME`` to its built directory (building it once); pass other values through."""
    if not name_or_path.startswith(BUILTIN_PREFIX):
        return name_or_path
    name = name_or_path[len(BUILTIN_PREFIX) :]
    if name not in BUILTINS:
        raise ValueError(f"unknown builtin model {name!r}; known: {sorted(BUILTINS)}")
    out_dir = BUILTINS[name]
    stamp = out_dir / "RECIPE_VERSION"
    if not (stamp.exists() and stamp.read_text() == str(RECIPE_VERSION)):
        # Build into a temporary sibling, then rename: parallel sweep jobs never see half a model.
        import os
        import shutil
        import tempfile

        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=out_dir.parent))
        say(f"building the embedded tiny model once, into {out_dir} (up to a minute on a slow CPU) ...")
        build(tmp)
        try:
            if out_dir.exists():
                shutil.rmtree(out_dir)
            os.replace(tmp, out_dir)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)  # another process won the race; its copy is identical
    return str(out_dir)


def is_builtin(name_or_path: str) -> bool:
    return name_or_path.startswith(BUILTIN_PREFIX)


def is_bundled(path: Optional[str]) -> bool:
    """A file the project ships (src/assets/data): the data the tiny model was built for."""
    return path is not None and Path(path).expanduser().resolve().parent == DATA_DIR.resolve()


def demo_note() -> str:
    """The line that says the builtin model is a toy and names the real ones (every other conf/model/ preset)."""
    presets = sorted(p.stem for p in (PROJECT_ROOT / "conf" / "model").glob("*.yaml") if p.stem != "tiny")
    return (
        "note: model=tiny is a 2-layer demo model built for tests and offline demos; its results on your own data "
        f"mean little. For real work pick a pretrained model: {', '.join(f'model={p}' for p in presets)} "
        "(conf/model/)"
    )


if __name__ == "__main__":
    print(build(Path(sys.argv[1])) if len(sys.argv) > 1 else resolve_builtin("builtin:tiny-llama"))
