#!/usr/bin/env bash
# Every measurement the project publishes about a built-in model release, in the order that
# each one needs the one before (the editing defaults first: everything else edits with them).
# Each stage resumes where it stopped, so after an interruption the same command continues:
#
#   scripts/measure-release.sh MODEL_FOLDER OUT_FOLDER [--quick]
#
# MODEL_FOLDER: an exported built-in model (e.g. runs/builtin-4/model); the chosen editing
# defaults are written into it (dds_edit_defaults.json).  OUT_FOLDER: reports, plots, the five
# translation runs (each against the paper's recipe: translation/compare-NAME.md) and the demo;
# OUT_FOLDER/stages.log says when each stage started and ended.
# --quick: the small presets and short translation runs (a check of the whole chain).
# DDS (default .venv/bin/dds) picks the command; STAGES (default: all) a space-separated subset
# of: defaults quality evidence translation demo, where a stage may also be named with its part
# (evidence/schedules, translation/full, translation/t-stratified, ...); PARALLEL=1 trains the
# chosen translation networks at once (on a GPU; on a small CPU, one torch thread each).
set -euo pipefail

MODEL=${1:?usage: scripts/measure-release.sh MODEL_FOLDER OUT_FOLDER [--quick]}
OUT=${2:?usage: scripts/measure-release.sh MODEL_FOLDER OUT_FOLDER [--quick]}
QUICK=${3:-}
DDS=${DDS:-.venv/bin/dds}
STAGES=${STAGES:-defaults quality evidence translation demo}
PARALLEL=${PARALLEL:-}
[ -d "$MODEL" ] || { echo "measure-release: no model folder '$MODEL'" >&2; exit 2; }
case "$QUICK" in ""|--quick) ;; *) echo "measure-release: unknown option '$QUICK'" >&2; exit 2;; esac
mkdir -p "$OUT"

stage() {  # stage NAME COMMAND...: run unless OUT/NAME.done exists; log start and end
    local name=$1; shift
    case " $STAGES " in *" ${name%%/*} "*|*" $name "*) ;; *) return 0;; esac
    [ -e "$OUT/$name.done" ] && { echo "== $name: done before"; return 0; }
    echo "$(date -u +%FT%TZ) start $name: $*" >> "$OUT/stages.log"
    echo "== $name: $*"
    "$@" || { local rc=$?; echo "measure-release: stage $name failed (exit $rc); the stages" \
        "before it are kept: fix the cause and run the same command again" >&2; exit "$rc"; }
    mkdir -p "$(dirname "$OUT/$name.done")" && touch "$OUT/$name.done"
    echo "$(date -u +%FT%TZ) end   $name" >> "$OUT/stages.log"
}

if [ -n "$QUICK" ]; then
    TRAIN=(--world-size 500 --steps 60 --checkpoint-every 20 --val-every 60); N=8
else
    TRAIN=(--world-size 5000 --steps 3000 --checkpoint-every 200 --val-every 200); N=32
fi
TASKS=(--task red:blue --task red:green --task red:yellow --task red:purple)

translation() {  # translation NAME [trainer options]: train (resuming) and evaluate one network
    # (stage runs it in a `||` list, where `set -e` does not act: each failure returns itself)
    local name=$1; shift
    local run="$OUT/translation/$name" resume=()
    [ -f "$run/config.json" ] && resume=(--resume latest)
    if [ ! -d "$run/model" ]; then
        "$DDS" translate-train --model "$MODEL" --data world "${TASKS[@]}" "${TRAIN[@]}" \
            --batch-size 8 --quiet --out "$run" "${resume[@]}" "$@" || return
    fi
    local baselines=()
    [ "$name" = full ] || baselines=(--baselines "")
    "$DDS" translate-eval --model "$run" --n "$N" "${baselines[@]}" --out "$run/eval.json"
}

stage defaults "$DDS" eval builtin-defaults --model "$MODEL" --write $QUICK \
    --out "$OUT/builtin-defaults"
stage quality "$DDS" eval builtin-quality --model "$MODEL" $QUICK --out "$OUT/builtin-quality"
# the timestep schedules first: the winner at the fewest calls becomes the model's recommended
# schedule (--write; docs/evidence.md), which the demo then edits with; `eval all` finds their
# parts done and only rewrites the report (Section 5 edits keep the paper's schedule)
stage evidence/schedules "$DDS" eval schedules --model "$MODEL" $QUICK --write \
    --out "$OUT/evidence/schedules"
stage evidence "$DDS" eval all --model "$MODEL" $QUICK --out "$OUT/evidence"
# the paper's recipe, its two ablations and the two trainer schedules (NAME options...)
NETWORKS=("full" "no-warmup --guidance-warmup 0" "sds --score sds"
          "t-stratified --t-schedule stratified" "t-descending --t-schedule descending")
if [ -n "$PARALLEL" ]; then  # one accelerator is far from busy with one batch-8 network
    pids=()
    for n in "${NETWORKS[@]}"; do stage "translation/${n%% *}" translation $n & pids+=($!); done
    for p in "${pids[@]}"; do wait "$p" || exit $?; done
else
    for n in "${NETWORKS[@]}"; do stage "translation/${n%% *}" translation $n; done
fi
# each ablation and trainer schedule against the paper's recipe, edit by edit (cheap: redone
# whenever both reports are there)
for n in "${NETWORKS[@]}"; do
    n=${n%% *}; r="$OUT/translation"
    if [ "$n" != full ] && [ -f "$r/full/eval.json" ] && [ -f "$r/$n/eval.json" ]; then
        "$DDS" translate-compare "$r/full/eval.json" "$r/$n/eval.json" --names "full,$n" \
            --out "$r/compare-$n.json" > "$r/compare-$n.md"
    fi
done
stage demo "$DDS" demo --model "$MODEL" --out "$OUT/demo"
echo "measure-release: every stage done; reports under $OUT"
