"""Save a random-weight OpenLLaMA-3B shape (the seed table's) with the tiny model's tokenizer, once, for the device
scripts, from the repo root: python3 -m benchmarks.results.random_w3b DIR (nothing to do when DIR/DONE exists)."""

import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

from benchmarks.workloads import W3B
from src.console import say
from src.tiny import resolve_builtin

out = Path(sys.argv[1])
if not (out / "DONE").is_file():
    start = time.time()
    config = LlamaConfig(**W3B, vocab_size=32000, tie_word_embeddings=False, max_position_embeddings=2048)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(resolve_builtin("builtin:tiny-llama")).save_pretrained(out)
    (out / "DONE").write_text("1")
    say(f"random-weight OpenLLaMA-3B shape saved in {time.time() - start:.0f}s")
