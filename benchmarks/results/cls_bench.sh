#!/usr/bin/env bash
# The classification workloads of src.bench on one GPU (issue 16): each seed recipe against the packed classifier,
# in the same process, on random weights and synthetic rows. Run from the repo root on the GPU machine, with the
# wheels installed to /tmp/site and PYTHONPATH=/tmp/site exported:
#   bash benchmarks/results/cls_bench.sh OUT_DIR [short] [bert] [bert-plan] [mistral]   (default: short bert mistral)
# Three invocations, shortest first, each writing OUT_DIR/<name>.json and .log as it ends (one that fails or is cut
# short leaves the others' results):
#   short    w3b-4bit-cls-short, 512 rows of 10-60 tokens, the default budget (the target has none)
#   bert     bert-large-4bit-cls, 2,048 rows of 6-24 tokens (32 steps of 8 x 8), the default budget, and the
#            length-grouped variant (padded batches from HF's length-grouped sampler) against packing
#   bert-plan  the same BERT rows, the fast side alone, at the default budget, at 1.5 GiB (which checkpoints) and
#            length-grouped: the planner's BERT coefficients checked at three layouts (not in the default set)
#   mistral  mistral7b-4bit-multilabel, 256 rows of 150-350 tokens, budgets 24 and 8 GiB (the targets' budgets)
# short and mistral also run the packed side without CUDA graphs (variant no-graphs): the graphs' share, measured.
# About 7-8 minutes on an H200, half of it building and loading the random Mistral-7B checkpoint (14.5 GB); to split
# it over two device calls, name the invocations to run (the checkpoints are rebuilt on a fresh machine).
# CLS_BENCH_ON_CPU=1 runs the same three invocations on the tiny workloads on CPU (a dry run of the script).
set -euo pipefail
out=${1:?output dir}; shift; mkdir -p "$out"
only=" ${*:-short bert mistral} "
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
models=${LORA_BENCH_MODELS:-/tmp/lora-bench-models}
if [[ "${CLS_BENCH_ON_CPU:-0}" == 1 ]]; then
  device=(--device cpu); short=tiny-cls; bert=tiny-bert-cls; mistral=tiny-multilabel; n_short=16; n_bert=64; n_mistral=16
else
  device=(); short=w3b-4bit-cls-short; bert=bert-large-4bit-cls; mistral=mistral7b-4bit-multilabel
  n_short=512; n_bert=2048; n_mistral=256
fi

run() {
  local name=$1; shift
  [[ "$only" == *" $name "* ]] || return 0
  local start=$SECONDS
  if python3 -m src.bench "${device[@]}" --model-dir "$models" --json "$out/$name.json" "$@" > "$out/$name.log" 2>&1; then
    awk '/^workload /{table=""} {table=table $0 "\n"} END{printf "%s", table}' "$out/$name.log" | grep -v '^results:'
  else
    echo "$name FAILED:"; tail -40 "$out/$name.log"
  fi
  echo "$name: $((SECONDS - start)) s"
}

run short --workload "$short" --examples "$n_short" --budgets default --variants no-graphs
run bert --workload "$bert" --examples "$n_bert" --budgets default --variants length-grouped
run bert-plan --workload "$bert" --examples "$n_bert" --sides fast --budgets default,1.5 --variants length-grouped
run mistral --workload "$mistral" --examples "$n_mistral" --budgets 24,8 --variants no-graphs

python3 - "$out" <<'PY'
import json, sys
from pathlib import Path
for path in sorted(Path(sys.argv[1]).glob("*.json")):
    report = json.loads(path.read_text())
    for run in report["runs"]:
        for s in run["sides"]:
            err = s["planner_error_pct"]
            print(
                f"{run['workload']:26} {s['side']:4} {s['settings'].get('variant') or '':14} "
                f"budget {s['budget_gb'] if s['side'] == 'fast' else '-'!s:7} tokens/s {s['tokens_per_s']:9,.0f} "
                f"ratio {s['ratio_over_seed'] or 0:5.2f}x peak {s['peak_gpu_mem_gb'] or 0:6.2f} GiB "
                f"plan {s['est_peak_gpu_mem_gb'] or 0:6.2f} GiB ({'-' if err is None else f'{err:+.0f}%'}) "
                f"MFU {100 * s['mfu']:4.1f}% attention {s['settings'].get('attention', '-')} "
                f"micro {s['settings'].get('micro_batch_size')}x{s['settings'].get('gradient_accumulation_steps')} "
                f"ckpt {s['settings'].get('checkpointed_layers', s['settings'].get('checkpointed'))} "
                f"cached {s['settings'].get('dequantized_layers', '-')} "
                f"graphs {s['settings'].get('graphs', s['settings'].get('cuda_graphs', '-'))}"
            )
    for failure in report["failed_variants"]:
        print("variant failed:", failure)
PY
