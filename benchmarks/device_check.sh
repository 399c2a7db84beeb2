#!/usr/bin/env bash
# The GPU checks as one prepared script, for a machine with a CUDA device (BENCHMARKS.md
# section 5): the CUDA tests, then the CUDA scaling tables, most important first, each
# step under its own time limit so that a slow one cannot starve the rest. A step stopped
# at its limit writes no block (the scripts write their tables at the end); its rows so
# far are in its log; the script then exits 1. The default limits add up to 540 s (and
# up to 10 s more a step killed past its limit), inside one 600 s device call;
# on an H200 the depth sweep needed more than its 70 s (L = 16 was cut), the rest fit.
#
#   bash benchmarks/device_check.sh OUTDIR
#
# Writes OUTDIR/steps.txt, logs.tgz (the machine and a log per step), scaling.md (the bench_scaling
# blocks, keys bench_scaling:<sweep>:cuda), scaling_cpu.md (two of its rows on the same
# machine's CPU) and transformers.md. Runs from a checkout
# without installing it (PYTHONPATH), with the machine's own python3 and torch: it needs
# torch with CUDA, pytest and (for the GPT-2 rows) transformers; mlflow is not needed.
set -u
out=${1:?usage: bash benchmarks/device_check.sh OUTDIR}
out=$(realpath -m -- "$out") || exit 1
logs=$(mktemp -d) || exit 1  # the logs travel back as one archive, $out/logs.tgz
trap 'rm -rf "$logs"' EXIT
failed=0
mkdir -p "$out" && : > "$out/steps.txt" || exit 1
cd "$(dirname "$0")/.." || exit 1
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 MPLBACKEND=Agg
py=${PYTHON:-python3}
dev=${DEVICE:-cuda}

step() {  # step NAME SECONDS COMMAND...: run it under a limit, log it, say how it ended
    local name=$1 limit=$2
    shift 2
    local t0=$SECONDS
    timeout -k 10 "$limit" "$@" > "$logs/$name.log" 2>&1
    local rc=$?
    [ "$rc" -eq 0 ] || failed=1
    echo "== $name: rc=$rc in $((SECONDS - t0)) s (limit $limit s)" | tee -a "$out/steps.txt"
    tail -n 5 "$logs/$name.log"
    tar czf "$out/logs.tgz" -C "$logs" .
}

{
    nvidia-smi -L 2>&1
    "$py" -c "import torch, sys; print(sys.version.split()[0], torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available() and torch.cuda.get_device_name(0))"
    nproc
} > "$logs/machine.txt" 2>&1
cat "$logs/machine.txt"
if [ "$dev" != cpu ] && ! "$py" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
    echo "device_check: torch sees no CUDA device here (the CUDA tests would all skip)" \
        | tee -a "$out/steps.txt" >&2
    tar czf "$out/logs.tgz" -C "$logs" .
    exit 1
fi

step tests "${TESTS_LIMIT:-90}" "$py" -m pytest -q -p no:cacheprovider -rs \
    tests/test_engine_cuda.py "tests/test_engine_model.py::test_cuda_reading_equals_the_cpu_reading"
step gpt2 "${GPT2_LIMIT:-120}" "$py" benchmarks/bench_scaling.py --device "$dev" --sweeps gpt2 \
    --repeats 3 --gpt2-budget 60 --write "$out/scaling.md"
for sweep in width rows layers; do  # one step a sweep: each writes its own block
    step "$sweep" "${SWEEP_LIMIT:-70}" "$py" benchmarks/bench_scaling.py --device "$dev" \
        --sweeps "$sweep" --repeats 3 --time-cap 10 --budget 30 --write "$out/scaling.md"
done
# The same machine's CPU on two of those configurations: a GPU/CPU ratio from one run.
step cpu "${CPU_LIMIT:-50}" "$py" benchmarks/bench_scaling.py --device cpu --sweeps width \
    --widths 1024,4096 --repeats 3 --time-cap 10 --budget 30 --write "$out/scaling_cpu.md"
step transformers "${TRANSFORMERS_LIMIT:-70}" "$py" benchmarks/bench_transformers.py \
    --device "$dev" --models gpt2-medium,pythia-1b --configs activation,none --repeats 2 \
    --single-above 20 --budget 55 --write "$out/transformers.md"
cat "$out/steps.txt"
exit "$failed"  # 1 when a step failed or was stopped at its limit
