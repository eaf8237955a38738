#!/usr/bin/env bash
# Classification speed through src.train, packed (train.fast_path=true, the default) against padded (false), on
# one GPU: a random-weight OpenLLaMA-3B shape at 4 bits, lora=all_linear, train=gpu, the real SST-2 train set
# (3,000 rows of short sentences), as issue 16 measured its baseline. Run from the repo root on the GPU machine:
#   bash benchmarks/results/cls_speed.sh OUT_DIR SST2_DIR [extra overrides...]
# Prints each run's train_tokens_per_s, steps/s and peak GPU memory from its MLflow record.
set -euo pipefail
out=${1:?output dir}; sst2=${2:?directory with SST-2 train.csv and dev.csv}; shift 2
mkdir -p "$out"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
model=/tmp/w3b-random
python3 -m benchmarks.results.random_w3b "$model"
uri="sqlite:///$out/mlflow.db"
for fast in true false; do
  python3 -m src.train model=openllama3b model.name_or_path="$model" quant=4bit lora=all_linear train=gpu \
    data=file data.path="$sst2/train.csv" data.eval_path="$sst2/dev.csv" data.task=classification \
    data.label_column=label data.subsample=3000 data.eval_subsample=256 train.num_train_epochs=1 \
    train.save_strategy=no train.eval_strategy=no tracking.log_adapter=false train.fast_path=$fast \
    tracking.tracking_uri="$uri" tracking.run_name=fast_path_$fast hydra.run.dir="$out/run-$fast" "$@" \
    > "$out/run-$fast.log" 2>&1 || { tail -40 "$out/run-$fast.log"; exit 1; }
done
python3 - "$uri" <<'PY'
import sys, mlflow
client = mlflow.MlflowClient(sys.argv[1])
runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
for r in sorted(runs, key=lambda r: r.info.run_name):
    m = r.data.metrics
    steps = m.get("train_runtime_s") and client.get_metric_history(r.info.run_id, "train_loss")[-1].step
    print(f"{r.info.run_name}: {r.info.status} tokens/s {m.get('train_tokens_per_s', 0):,.0f}  "
          f"tokens {m.get('train_tokens', 0):,.0f}  runtime {m.get('train_runtime_s', 0):.1f} s  "
          f"steps/s {steps / m['train_runtime_s']:.2f}  peak {m.get('peak_gpu_mem_gb', 0):.2f} GiB  "
          f"objective {m.get('objective', 0):.4f}")
PY
