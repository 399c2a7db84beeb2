#!/usr/bin/env bash
# The main job on the embedded default: start `ddsmon watch` on the grokking example's
# checkpoint directory (MLflow's local SQLite store, mlflow.db in the current directory,
# nothing to start), then train in the background while the watcher reads each checkpoint
# as it lands; once training ends, give the watcher time to catch up, stop it, and let
# `ddsmon scan` pick up anything it had not reached (restart-safe: nothing is read
# twice). It says how many checkpoints the live watcher read and how many the scan did.
#
#   bash examples/demo.sh            # then: mlflow ui --backend-store-uri sqlite:///mlflow.db
#
# DDSMON_DEMO_DIR (default runs/demo) holds the checkpoints, the probe, events.jsonl and
# the logs (watch.log: the watcher's lines, shown as they come; train.log; scan.log).
# Training starts once the watcher is ready, as you would start them by hand. The trainer
# runs on one torch thread (--threads 1) and waits DDSMON_DEMO_DELAY seconds (0.3) after
# each checkpoint, so on two cores the watcher has a core of its own.
# DDSMON_DEMO_CATCH_UP (120) bounds the wait for the watcher after training.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
RUN=${DDSMON_DEMO_DIR:-runs/demo}
STEPS=${DDSMON_DEMO_STEPS:-1000}
EVERY=${DDSMON_DEMO_EVERY:-25}
PY=${PYTHON:-python}
DDSMON=(ddsmon)
command -v ddsmon >/dev/null || DDSMON=("$PY" -m ddsmon.cli)
rm -rf "$RUN"
mkdir -p "$RUN/ckpts"
TOTAL=$(( STEPS / EVERY + 1 + (STEPS % EVERY > 0) ))
# the watcher's plain output (one "step N  ckpt=..." line per checkpoint it has read)
read_so_far() { grep -c '^step [0-9]*  ckpt=' "$RUN/watch.log" || true; }

COMMON=(--model "$HERE/modular_addition/model.py:make_model" --probe "$RUN/probe.pt"
        --loss ce --experiment ddsmon-demo --events-json "$RUN/events.jsonl")

TRAIN_ARGS=(--out "$RUN/ckpts" --probe-out "$RUN/probe.pt")
"$PY" "$HERE/modular_addition/train.py" "${TRAIN_ARGS[@]}" --probe-only >"$RUN/train.log" 2>&1

echo "demo: ddsmon watch $RUN/ckpts (MLflow: sqlite:///mlflow.db), started before training"
"${DDSMON[@]}" watch "$RUN/ckpts" "${COMMON[@]}" --quiet 0.5 >"$RUN/watch.log" 2>&1 &
WATCH=$!
tail -n +1 -f "$RUN/watch.log" &
SHOW=$!
trap 'kill -INT $WATCH 2>/dev/null || true; kill $SHOW 2>/dev/null || true' EXIT
# train once the watcher is ready (its first line says what it watches), as you would
for _ in $(seq 1200); do
    grep -q '^ddsmon watch ' "$RUN/watch.log" && break
    kill -0 $WATCH 2>/dev/null || { echo "demo: ddsmon watch stopped early" >&2; exit 1; }
    sleep 0.1
done

echo "demo: training the modular-addition model in the background -> $RUN/ckpts"
"$PY" "$HERE/modular_addition/train.py" "${TRAIN_ARGS[@]}" --steps "$STEPS" --every "$EVERY" \
    --delay "${DDSMON_DEMO_DELAY:-0.3}" --threads 1 >>"$RUN/train.log" 2>&1 &
TRAIN=$!
trap 'kill $TRAIN 2>/dev/null || true; kill -INT $WATCH 2>/dev/null || true; kill $SHOW 2>/dev/null || true' EXIT
wait $TRAIN
WHILE_TRAINING=$(read_so_far)
for _ in $(seq "$(( ${DDSMON_DEMO_CATCH_UP:-120} * 4 ))"); do
    [ "$(read_so_far)" -ge "$TOTAL" ] && break
    kill -0 $WATCH 2>/dev/null || break
    sleep 0.25
done
sleep 1  # the watcher's last writes to MLflow
kill -INT $WATCH 2>/dev/null || true
wait $WATCH || true
sleep 0.3  # the last lines shown
kill $SHOW 2>/dev/null || true
trap - EXIT
LIVE=$(read_so_far)

echo "demo: ddsmon scan reads whatever the watcher had not reached"
status=0
"${DDSMON[@]}" scan "$RUN/ckpts" "${COMMON[@]}" 2>"$RUN/scan.log" || status=$?
cat "$RUN/scan.log" >&2
[ "$status" -eq 0 ] || exit "$status"
SCANNED=$(sed -n 's/^scan: \([0-9]*\) read.*/\1/p' "$RUN/scan.log" | tail -1)
echo "demo: of $TOTAL checkpoints, the live watcher read $LIVE ($WHILE_TRAINING while training ran), the follow-up scan ${SCANNED:-0}"
echo "demo: events flagged ($RUN/events.jsonl):"
"$PY" - "$RUN/events.jsonl" <<'PY'
import json, sys
from pathlib import Path
path = Path(sys.argv[1])
events = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
for e in events:
    if e["kind"] in ("transition", "rank_change", "nonfinite"):
        print(f"  step {e['step']:>6}  {e['kind']:<12} {e['layer']:<10} {e['message']}")
print(f"  {len(events)} events in all; {sum(e['kind'] == 'transition' for e in events)} transition(s)")
PY
echo "demo: review in the MLflow UI: mlflow ui --backend-store-uri sqlite:///mlflow.db"
