#!/usr/bin/env bash
# The shipped seed_table sweep on one GPU, default isolation, on a random-weight OpenLLaMA-3B (the seed table's
# shape) with the tiny model's tokenizer and the bundled SFT data. Run on the GPU machine from the repo root:
#   bash benchmarks/results/seed_table_gpu.sh OUT_DIR [extra overrides...]
# Prints the sweep's output, a per-run table (status, GPU, times) and src.compare's table.
set -euo pipefail
out=${1:?output dir}; shift
mkdir -p "$out"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
model=/tmp/w3b-random
python3 -m benchmarks.results.random_w3b "$model"
uri="sqlite:///$out/mlflow.db"
start=$(date +%s)
set +e
python3 -m src.train -cd sweeps -cn seed_table model.name_or_path="$model" data=instructions \
  tracking.tracking_uri="$uri" hydra.sweep.dir="$out/multirun" "$@" 2>&1 | tee "$out/sweep.log"
code=${PIPESTATUS[0]}
set -e
echo "sweep exit code $code, wall $(( $(date +%s) - start )) s"
python3 benchmarks/results/sweep_report.py "$uri"
python3 -m src.compare --tracking-uri "$uri" --format md
exit "$code"
