#!/usr/bin/env bash
# One command for a lent GPU, about 8 minutes on one H100/H200 (so it can be rerun within
# a 15-minute loan): the GPU test group, the full-size checks in bf16 (SD 2.1, and FLUX.2
# [klein] at its widths: not yet timed on a GPU), SD 2.1-sized decode and training
# benchmarks; everything goes to one markdown report.
#
#   bash scripts/gpu_check.sh [report.md]        # default: runs/gpu_check/report.md
#
# Without a CUDA device it prints "no CUDA device" and exits 1. Each part has its own time
# limit; a part that fails or runs over is marked in the report and the exit status is 1.
set -uo pipefail
cd "$(dirname "$0")/.."

if ! python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "no CUDA device"
    exit 1
fi
report=${1:-runs/gpu_check/report.md}
mkdir -p "$(dirname "$report")"
: >"$report"
status=0

part() {  # part <title> <seconds> <command...>: a report section, its time, its outcome
    local title=$1 limit=$2 start=$SECONDS rc
    shift 2
    printf '\n## %s\n\n```\n' "$title" | tee -a "$report"
    timeout "$limit" "$@" 2>&1 | grep -v -e "it/s]" -e "Warning" | tee -a "$report"
    rc=${PIPESTATUS[0]}
    printf '```\n%s: exit %s in %ss (limit %ss)\n' "$title" "$rc" $((SECONDS - start)) "$limit" \
        | tee -a "$report"
    [ "$rc" -eq 0 ] || status=1
}

{
    echo "# perco GPU check, $(date -u +%F)"
    python - <<'PY'
import diffusers, torch, transformers
p = torch.cuda.get_device_properties(0)
print(f"\n{torch.cuda.get_device_name(0)}, {p.total_memory / 2**30:.0f} GiB, "
      f"{torch.cuda.device_count()} device(s); torch {torch.__version__} (CUDA "
      f"{torch.version.cuda}), diffusers {diffusers.__version__}, "
      f"transformers {transformers.__version__}")
PY
} | tee -a "$report"

export PERCO_ASSETS="${PERCO_ASSETS:-../shared/assets}"
part "pytest -m gpu" 240 python -m pytest -m gpu -q -p no:cacheprovider
part "full size, bf16, 256² crop (scripts/full_size_check.py)" 150 \
    python scripts/full_size_check.py --device cuda --dtype bf16 --size 256
part "FLUX.2 [klein] widths, bf16, 256² crop (scripts/full_size_check.py --backbone flux2)" 120 \
    python scripts/full_size_check.py --backbone flux2 --device cuda --dtype bf16 --size 256
part "decode 768×512, bf16 SDPA (scripts/bench_decode.py)" 120 \
    python scripts/bench_decode.py --model sd21 --steps 1 5 20 --variants "bf16 sdpa" --repeats 2
part "one training step at 512², bf16 (scripts/bench_train.py)" 150 \
    python scripts/bench_train.py --model sd21 --modes linear full lora --dtype bf16 --batch 8 \
    --repeats 2
echo "report: $report"
exit $status
