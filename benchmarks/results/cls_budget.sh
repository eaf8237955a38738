#!/usr/bin/env bash
# The packed classifier planned to a memory budget, on one GPU: random-weight Qwen2.5-0.5B shape, rows that fill
# model.max_length=512, batch 16, train.memory_budget_gb=3. Prints the plan and the measured peak.
#   bash benchmarks/results/cls_budget.sh OUT_DIR
set -euo pipefail
out=${1:?output dir}; mkdir -p "$out"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
model=/tmp/qwen-random
python3 - "$model" <<'PY'
import sys, torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from src.tiny import resolve_builtin
from tests.gpu.test_gpu_acceptance import QWEN25_05B
torch.manual_seed(0)
with torch.device("cuda"):
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model("qwen2", **QWEN25_05B), dtype=torch.bfloat16)
model.save_pretrained(sys.argv[1]); AutoTokenizer.from_pretrained(resolve_builtin("builtin:tiny-llama")).save_pretrained(sys.argv[1])
PY
long=$(python3 -c "print('{text} ' * 60)")
python3 -m src.train model=qwen25_05b model.name_or_path=$model model.max_length=512 quant=4bit train=gpu \
  data=topics "data.text_template='$long'" data.subsample=64 data.eval_subsample=16 train.eval_strategy=no \
  train.save_strategy=no train.max_steps=3 train.per_device_train_batch_size=16 train.memory_budget_gb=3 \
  tracking.log_adapter=false tracking.tracking_uri=sqlite:///$out/mlflow.db hydra.run.dir=$out/run 2>&1 \
  | grep -E "fast path|finished|Error|error" || true
python3 - "sqlite:///$out/mlflow.db" <<'PY'
import sys, mlflow
(r,) = mlflow.MlflowClient(sys.argv[1]).search_runs(["1"])
m = r.data.metrics
print(r.info.status, "peak", round(m["peak_gpu_mem_gb"], 3), "plan", round(m["fast_path_est_peak_gpu_mem_gb"], 3), "budget 3")
PY
