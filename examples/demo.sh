#!/usr/bin/env bash
# The main job on the embedded default: train the grokking example in the background,
# watch its checkpoints with `ddsmon watch` (MLflow's local SQLite store, mlflow.db in
# the current directory, nothing to start), then stop the watcher and let `ddsmon scan`
# pick up anything still queued (restart-safe: nothing is read twice).
#
#   bash examples/demo.sh            # then: mlflow ui --backend-store-uri sqlite:///mlflow.db
#
# DDSMON_DEMO_DIR (default runs/demo) holds the checkpoints, the probe and events.jsonl.
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

COMMON=(--model "$HERE/modular_addition/model.py:make_model" --probe "$RUN/probe.pt"
        --loss ce --experiment ddsmon-demo --events-json "$RUN/events.jsonl")

echo "demo: training the modular-addition model in the background -> $RUN/ckpts"
"$PY" "$HERE/modular_addition/train.py" --out "$RUN/ckpts" --probe-out "$RUN/probe.pt" \
    --steps "$STEPS" --every "$EVERY" --delay "${DDSMON_DEMO_DELAY:-0.3}" --threads 1 >"$RUN/train.log" 2>&1 &
TRAIN=$!
trap 'kill $TRAIN 2>/dev/null || true' EXIT
for _ in $(seq 600); do [ -s "$RUN/probe.pt" ] && break; sleep 0.1; done

echo "demo: ddsmon watch $RUN/ckpts (MLflow: sqlite:///mlflow.db)"
"${DDSMON[@]}" watch "$RUN/ckpts" "${COMMON[@]}" --quiet 0.5 &
WATCH=$!
wait $TRAIN
trap - EXIT
sleep 3
kill -INT $WATCH
wait $WATCH || true

echo "demo: ddsmon scan reads whatever the watcher had not reached yet"
"${DDSMON[@]}" scan "$RUN/ckpts" "${COMMON[@]}"
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
