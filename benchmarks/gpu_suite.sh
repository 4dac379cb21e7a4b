#!/usr/bin/env bash
# The speed suite in one command: kernels, one transformer step per attention backend, regional
# compile cold start, and the step-cache quality table; one JSON summary with every result.
#
#   benchmarks/gpu_suite.sh                 # on a GPU: full FLUX shapes (flux-dev, 1024², bf16)
#   benchmarks/gpu_suite.sh --smoke         # anywhere (CPU): tiny shapes, end to end, ~minutes
#   OUT=path/summary.json benchmarks/gpu_suite.sh --smoke
#
# Each part writes its own JSON under benchmarks/results/ (or $RESULTS); the summary collects them
# with the exit status of each part, so one failing part does not hide the others.
set -u
cd "$(dirname "$0")/.."
SMOKE=0
[ "${1:-}" = "--smoke" ] && SMOKE=1
PY=${PYTHON:-python}
RESULTS=${RESULTS:-benchmarks/results/suite}
OUT=${OUT:-$RESULTS/gpu_suite.json}
mkdir -p "$RESULTS" "$(dirname "$OUT")"
STATUS="$RESULTS/status.txt"
: >"$STATUS"

part() {  # part NAME COMMAND...: run it, record its exit status
  local name=$1
  shift
  echo "=== $name: $*"
  "$@"
  echo "$name $?" >>"$STATUS"
}

if [ "$SMOKE" = 1 ]; then
  part kernels $PY benchmarks/kernels.py --device cpu --dtype fp32 --lengths 77 --heads 2 --hidden 64 \
    --norm-length 77 --warmup 1 --iters 2 --providers sdpa-flash eager --out "$RESULTS/kernels.json"
  part step $PY benchmarks/step.py --preset tiny-dev --size 64 --txt-len 16 --device cpu --dtype fp32 \
    --warmup 1 --iters 2 --backends sdpa eager --out "$RESULTS/step.json"
  part compile $PY benchmarks/compile.py --presets tiny-dev --size 64 --txt-len 8 --backend eager \
    --modes eager regional-cold --out "$RESULTS/compile.json"
  part cache $PY benchmarks/cache.py --smoke --skip-mid --out "$RESULTS/cache.json"
else
  part kernels $PY benchmarks/kernels.py --out "$RESULTS/kernels.json"
  part step $PY benchmarks/step.py --out "$RESULTS/step.json"
  part compile $PY benchmarks/compile.py --device cuda --dtype bf16 --presets flux-dev --size 1024 \
    --txt-len 512 --out "$RESULTS/compile.json"
  part cache $PY benchmarks/cache.py --out "$RESULTS/cache.json"
fi

$PY - "$RESULTS" "$OUT" "$SMOKE" <<'EOF'
import json, sys
from pathlib import Path

results, out, smoke = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3] == "1"
status = dict(line.split() for line in (results / "status.txt").read_text().splitlines())
summary = {"smoke": smoke, "parts": {}}
for name, code in status.items():
    path = results / f"{name}.json"
    summary["parts"][name] = {
        "exit_status": int(code),
        "result": json.loads(path.read_text()) if path.is_file() else None,
    }
out.write_text(json.dumps(summary, indent=2) + "\n")
print(f"wrote {out}: " + ", ".join(f"{k} {'ok' if v['exit_status'] == 0 else 'FAILED'}" for k, v in summary["parts"].items()))
sys.exit(0 if all(v["exit_status"] == 0 for v in summary["parts"].values()) else 1)
EOF
