#!/usr/bin/env bash
# Floor smoke test: install the lower bounds of pyproject's core dependencies (.ci/floors.txt) into a
# second virtual environment and run (a) the README's default run and (b) a two-job grid there, then
# check that the MLflow store holds them as FINISHED runs. Called by .ci/run after the test suite;
# runs alone too: `bash .ci/floor_smoke.sh` (FLOOR_VENV=/some/dir to put the environment elsewhere).
# The grid is shortened (3 steps, 48/24 rows); the default run is the README's, unshortened. Measured on
# 2 cores: about 1 minute with the environment and the tiny model already there, about 4 minutes from
# scratch on a busy machine (1.5 min install, under 2 min default run with the tiny model's build, 30 s grid).
set -euo pipefail
cd "$(dirname "$0")/.."

start=$(date +%s)
venv="${FLOOR_VENV:-.venv-floor}"
python3 -m venv "$venv"
py="$venv/bin/python"
"$py" -m pip install -q --upgrade pip
# torch: pyproject's floor is for the GPU machine (see pyproject.toml); here the CPU wheel on disk.
"$py" -m pip install -q "torch==2.13.0" -c .ci/floors.txt -e .

# The environment must hold exactly the pinned floors (a constraint cannot be silently ignored, but say so).
"$py" - <<'EOF'
import re
from importlib.metadata import version
from pathlib import Path

bad = []
for line in Path(".ci/floors.txt").read_text().splitlines():
    line = line.split("#", 1)[0].strip()
    if not line:
        continue
    name, pin = re.split(r"\s*==\s*", line)
    if version(name) != pin:
        bad.append(f"{name} {version(name)} != {pin}")
if bad:
    raise SystemExit("floor env does not hold the floors: " + "; ".join(bad))
print("floor env:", ", ".join(f"{n}=={version(n)}" for n in ["torch", "transformers", "peft", "trl", "accelerate",
      "datasets", "bitsandbytes", "mlflow", "optuna", "hydra-core", "omegaconf"]))
EOF

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# (a) the default run, as the README gives it (tiny model, bundled topics data, 16-bit LoRA, ~1 minute).
t0=$(date +%s)
"$py" -m src.train "tracking.tracking_uri=sqlite:///$work/default.db" "hydra.run.dir=$work/default" \
  > "$work/default.log" 2>&1 || { tail -n 60 "$work/default.log"; echo "FLOOR SMOKE FAILED: default run exited non-zero"; exit 1; }
t_default=$(( $(date +%s) - t0 ))

# (b) a two-job grid: one MLflow parent run and two child runs, shortened to a few steps.
t0=$(date +%s)
"$py" -m src.train --multirun lora.r=4,8 train.max_steps=3 data.subsample=48 data.eval_subsample=24 \
  "tracking.tracking_uri=sqlite:///$work/grid.db" "hydra.sweep.dir=$work/grid" \
  > "$work/grid.log" 2>&1 || { tail -n 60 "$work/grid.log"; echo "FLOOR SMOKE FAILED: grid exited non-zero"; exit 1; }
t_grid=$(( $(date +%s) - t0 ))

"$py" - "$work" "$t_default" "$t_grid" "$(( $(date +%s) - start ))" <<'EOF'
import sys

import mlflow

work, t_default, t_grid, t_total = sys.argv[1:]


def runs(db):
    client = mlflow.MlflowClient(f"sqlite:///{work}/{db}")
    ids = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(ids, max_results=100)


problems = []
default = runs("default.db")
if [r.info.status for r in default] != ["FINISHED"]:
    problems.append(f"default run: want 1 FINISHED run, got {[r.info.status for r in default]}")
grid = runs("grid.db")
parents = [r for r in grid if "mlflow.parentRunId" not in r.data.tags]
children = [r for r in grid if "mlflow.parentRunId" in r.data.tags]
if len(parents) != 1 or parents[0].info.status != "FINISHED":
    problems.append(f"grid: want 1 FINISHED parent, got {[r.info.status for r in parents]}")
elif len(children) != 2 or any(c.info.status != "FINISHED" for c in children) or any(
    c.data.tags["mlflow.parentRunId"] != parents[0].info.run_id for c in children
):
    problems.append(f"grid: want 2 FINISHED children of the parent, got {[c.info.status for c in children]}")
if problems:
    raise SystemExit("FLOOR SMOKE FAILED: " + "; ".join(problems))
acc = default[0].data.metrics.get("eval_accuracy", float("nan"))
print(
    f"FLOOR SMOKE OK: default run FINISHED (eval_accuracy={acc:.3f}, {t_default} s), "
    f"grid parent + 2 children FINISHED ({t_grid} s); {t_total} s with the install"
)
EOF
