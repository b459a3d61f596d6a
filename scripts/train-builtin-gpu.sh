#!/usr/bin/env bash
# Train the built-in model's UNet on a GPU for a fixed wall-clock budget, sized by a probe:
#
#   scripts/train-builtin-gpu.sh SEED_RUN RUN_DIR SECONDS [BATCH] [WORKERS] [-- trainer options]
#
# SEED_RUN: a run folder of the fourth preset whose stages 0 and 1 are finished (text.pt,
# vae.pt; e.g. runs/builtin-4), copied into RUN_DIR so that only the UNet trains.
# SECONDS: the whole budget, probe included. BATCH (default 256) and WORKERS (scene-rendering
# processes, default: the CPU's cores less two) set the step.
#
# 1. benchmarks/bench_train_step.py times the renderer alone and a compute-bound step (each
#    rendered batch serving 8 steps);
# 2. the smallest --batch-reuse K that keeps the step compute-bound is chosen (at most 8), and
#    --unet-steps N so that N steps fill 85% of the time left (a multiple of 500, at least 500):
#    the cosine schedule then ends inside the budget;
# 3. dds train-builtin --preset fourth-gpu trains with --time-limit as a safety net: a run that
#    outlasts its budget still exports the EMA weights of the step it reached, and the same
#    command resumes it.
# PY (default python3) picks the interpreter. The model lands in RUN_DIR/model.
set -euo pipefail

# The positionals end at "--" (or after five); what follows goes to the trainer.
POS=()
while [ $# -gt 0 ] && [ "$1" != "--" ] && [ ${#POS[@]} -lt 5 ]; do POS+=("$1"); shift; done
[ "${1:-}" = "--" ] && shift
USAGE="usage: scripts/train-builtin-gpu.sh SEED_RUN RUN_DIR SECONDS [BATCH] [WORKERS] [-- options]"
[ ${#POS[@]} -ge 3 ] || { echo "$USAGE" >&2; exit 2; }
SEED=${POS[0]}
RUN=${POS[1]}
BUDGET=${POS[2]}
BATCH=${POS[3]:-256}
WORKERS=${POS[4]:-$(( $(nproc) > 3 ? $(nproc) - 2 : 1 ))}
PY=${PY:-python3}
[ -f "$SEED/text.pt" ] && [ -f "$SEED/vae.pt" ] || {
    echo "train-builtin-gpu: $SEED holds no finished text.pt and vae.pt" >&2; exit 2; }
[[ "$BUDGET" =~ ^[0-9]+$ ]] || { echo "train-builtin-gpu: SECONDS must be a whole number" >&2; exit 2; }
T0=$(date +%s)
elapsed() { echo $(( $(date +%s) - T0 )); }

PROBE=$($PY benchmarks/bench_train_step.py --from-run "$SEED" --preset fourth-gpu --device cuda \
    --steps 80 --skip 20 --workers "$WORKERS" --batch-size "$BATCH" --batch-reuse 8 --render 20)
echo "$PROBE"
STEP=$(echo "$PROBE" | tail -1)
RATE=$(echo "$PROBE" | sed -n 's/^renderer alone: \([0-9]*\) scenes.*/\1/p')
read -r REUSE STEP STEPS < <($PY - "$STEP" "$RATE" "$BATCH" "$BUDGET" "$(elapsed)" <<'EOF'
import math, sys
step, rate, batch, budget, spent = map(float, sys.argv[1:])
reuse = max(1, min(8, math.ceil(batch / (step * rate))))
step = max(step, batch / (reuse * rate))      # the renderer may still set the pace
left = budget - spent - 60                    # judge reading, sample grids, export
print(reuse, f"{step:.4f}", max(500, int(left * 0.85 / step) // 500 * 500))
EOF
)
echo "[$(elapsed) s] $STEP s a step at batch reuse $REUSE (renderer: $RATE scenes/s): $STEPS steps"
mkdir -p "$RUN"
cp "$SEED/text.pt" "$SEED/vae.pt" "$RUN/"
$PY -m dds.builtin.train --preset fourth-gpu --device cuda --data-workers "$WORKERS" \
    --batch-size "$BATCH" --batch-reuse "$REUSE" --unet-steps "$STEPS" --run-dir "$RUN" \
    --time-limit $(( BUDGET - $(elapsed) - 30 )) --quiet "$@"
echo "[$(elapsed) s] done"
