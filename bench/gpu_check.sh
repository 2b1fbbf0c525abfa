#!/usr/bin/env bash
# Everything this project checks on a lent GPU, in one call (the device tool's $OUT receives the
# results; elsewhere pass a folder as $1):
#   1. bench/speed.py --profile gpu: every figure of the speed issue, naive baseline side by side,
#      the open goals first (each training lever of docs/speed.md in turn, the CUDA-graph step, MPL's
#      cost, the trace), the inference figures (met) last, then the compiled entries by priority
#      (the training step as --compile on compiles it: compile time cold, then warm from the cache it
#      left) until SPEED_BUDGET_S seconds (then its JSON/Markdown are final);
#   2. trainSupervised.py and trainUnsupervised.py with --cuda-graph on, 20 iterations each at the
#      synthetic data's size: the captured step inside the real loop (loaders, validation, checkpoints);
#   3. the main job at a small size on CUDA with the scripts' CUDA defaults (bf16 autocast,
#      channels_last, cudnn.benchmark): every stage, checkpoint, evaluation and table end to end.
# Each part has its own hard time limit, so the whole call stays inside the device's 10 minutes
# (defaults: at most about 590 s with the data generation; call the device with timeout_s 600).
#
#   UDA_GIT_COMMIT=$(git rev-parse HEAD) bash bench/gpu_check.sh "$OUT"
set -u
OUT_DIR=${1:-${OUT:-bench/results/gpu_check}}
SPEED_BUDGET_S=${SPEED_BUDGET_S:-340}
SPEED_LIMIT_S=${SPEED_LIMIT_S:-$((SPEED_BUDGET_S + 50))}
SMOKE_LIMIT_S=${SMOKE_LIMIT_S:-90}  # 0: skip the main job and the --cuda-graph runs
GRAPH_LIMIT_S=${GRAPH_LIMIT_S:-50}  # each of the two --cuda-graph runs
DEVICE=${DEVICE:-cuda}
PYTHON=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
mkdir -p "$OUT_DIR"

{
    date -u
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,power.limit,temperature.gpu \
        --format=csv 2>&1 || echo "no nvidia-smi"
    $PYTHON -c "import sys, torch, torchvision, numpy, PIL; print(sys.version); print('torch', torch.__version__, \
'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version(), 'torchvision', torchvision.__version__, \
'numpy', numpy.__version__, 'pillow', PIL.__version__, 'gpu', torch.cuda.is_available() and torch.cuda.get_device_name())"
    nproc
} > "$OUT_DIR/environment.txt" 2>&1
cat "$OUT_DIR/environment.txt"

echo "== speed (budget ${SPEED_BUDGET_S} s, hard limit ${SPEED_LIMIT_S} s)"
timeout -k 10 "$SPEED_LIMIT_S" $PYTHON bench/speed.py --device "$DEVICE" --profile "${SPEED_PROFILE:-gpu}" \
    --out "$OUT_DIR" --budget-s "$SPEED_BUDGET_S" ${SPEED_ARGS:-} > "$OUT_DIR/speed.log" 2>&1
echo "speed.py exit status $?"
tail -n 40 "$OUT_DIR/speed.log"

[ "$SMOKE_LIMIT_S" -gt 0 ] || exit 0
SMOKE=$(mktemp -d)
$PYTHON -m dataset.synthetic --out "$SMOKE/data" --num-source 40 --num-target-train 24 --num-target-val 8 --quiet

for script in trainSupervised.py trainUnsupervised.py; do
    echo "== $script --cuda-graph on at a small size on $DEVICE (hard limit ${GRAPH_LIMIT_S} s)"
    timeout -k 5 "$GRAPH_LIMIT_S" $PYTHON $script --device "$DEVICE" --data-root "$SMOKE/data" \
        --output-dir "$SMOKE/graph_${script%.py}" --cuda-graph on --max-iters 20 --val-every 10 --log-every 5 \
        --batch-size 4 --workers 4 --no-progress > "$OUT_DIR/cuda_graph_${script%.py}.log" 2>&1
    echo "$script --cuda-graph on exit status $?"
    tail -n 12 "$OUT_DIR/cuda_graph_${script%.py}.log"
done

echo "== main job at a small size on $DEVICE (hard limit ${SMOKE_LIMIT_S} s)"
timeout -k 10 "$SMOKE_LIMIT_S" bash -c "
    $PYTHON experiments.py --device '$DEVICE' --data-root '$SMOKE/data' --output-dir '$SMOKE/results' \
        --supervised-iterations 20 --iterations 20 --adapt-iterations 10 --pseudo-iterations 10 --mpl-iterations 10 --val-every 10 \
        --batch-size 4 --workers 4 --no-progress" > "$OUT_DIR/smoke.log" 2>&1
echo "main job exit status $?"
tail -n 25 "$OUT_DIR/smoke.log"
cp "$SMOKE/results/results.json" "$OUT_DIR/smoke_results.json" 2>/dev/null
rm -rf "$SMOKE"
