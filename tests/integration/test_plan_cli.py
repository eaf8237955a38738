"""``python -m src.plan`` as a process: the command line counts a QLoRA config-only model."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.unit import test_plan
from tests.unit.test_plan import OPENLLAMA_3B_PARAMS, ROOT

openllama, openllama_dir = test_plan.openllama, test_plan.openllama_dir  # the in-process tests' fixtures



def test_cli_counts_qlora_all_linear_with_lm_head(openllama_dir):
    overrides = openllama(openllama_dir, "quant=4bit", "lora=all_linear", "lora.target_modules=[all_linear,lm_head]")
    proc = subprocess.run(
        [sys.executable, "-m", "src.plan", *overrides], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    result = json.loads(lines[-1])
    assert result["trainable_params"] == 12_994_560
    assert result["base_params"] == OPENLLAMA_3B_PARAMS
    assert result["total_params"] == OPENLLAMA_3B_PARAMS + 12_994_560
    assert result["lora_resolved_targets"] == "down_proj,gate_proj,k_proj,lm_head,o_proj,q_proj,up_proj,v_proj"
    assert result["est_peak_gpu_mem_gb"] > 0
    assert any("lm_head" in w for w in result["warnings"])  # TRL's SFTTrainer refuses an adapter on the head
    assert any(line.startswith("trainable params") and "12,994,560" in line for line in lines[:-1])
