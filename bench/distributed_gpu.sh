#!/usr/bin/env bash
# The distributed path on CUDA: torchrun world size 1, NCCL for the all-reduce (gloo for objects),
# `stats` over the MNIST test split and `evaluate` over 64 images with the model on the GPU, compared
# with the CPU single-process CLI run. Prints times and the largest differences.
#
#   bash bench/distributed_gpu.sh [RUN_FOLDER]     (default: trains a small lab network into a temp dir)
#
# Needs a CUDA build of torch 2.13 and one GPU. Expected: counts equal, maxima within float32
# rounding of the CPU (GPU convolutions differ from CPU ones in the last bits), sums ≤ 1e-5 relative.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONWARNINGS=ignore
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
RUN=${1:-$WORK/run}
if [ ! -f "$RUN/model.pt" ]; then
  $PY -c "from convlens.training import make_recipe, train; train('$RUN', make_recipe('best', epochs=2), seed=0, progress=False, subset=12000)"
fi
EVAL_ARGS="--mnist-test 64 --methods gradcam,saliency --sanity-images 0 --no-data-randomization --quiet"

start=$(date +%s.%N)
$PY -m convlens stats --model "$RUN" --out "$WORK/cpu-stats" --quiet >/dev/null
$PY -m convlens evaluate --model "$RUN" --out "$WORK/cpu-eval" $EVAL_ARGS >/dev/null
echo "CPU single process (stats + evaluate, with start-up): $(echo "$(date +%s.%N) - $start" | bc) s"

cat > "$WORK/gpu.py" <<'EOF'
import sys, time
import torch
from convlens import distributed
from convlens.analysis import statistics
from convlens.evaluation.run import evaluate
from convlens.models import load_model

run, work = sys.argv[1], sys.argv[2]
assert torch.cuda.is_available(), "no CUDA device"
distributed.setup()
print(f"world size {distributed.world_size()}, backend {torch.distributed.get_backend()}, "
      f"device {torch.cuda.get_device_name()}")
loaded = load_model(run, device="cuda")
assert distributed.collective_device(distributed.device_of(loaded.model)).type == "cuda"
t = time.perf_counter()
statistics(loaded, f"{work}/gpu-stats", progress=False)
torch.cuda.synchronize()
print(f"GPU stats over 10,000 test images: {time.perf_counter() - t:.2f} s")
t = time.perf_counter()
evaluate(loaded, f"{work}/gpu-eval", methods=["gradcam", "saliency"], mnist_test=64, sanity_images=0,
         data_randomization=False, progress=False)
torch.cuda.synchronize()
print(f"GPU evaluate over 64 images: {time.perf_counter() - t:.2f} s")
distributed.teardown()
EOF
$PY -m torch.distributed.run --nproc-per-node 1 --master-addr 127.0.0.1 --master-port 29533 "$WORK/gpu.py" "$RUN" "$WORK"

$PY - "$WORK" <<'EOF'
import json, sys
import numpy as np
work = sys.argv[1]
a, b = np.load(f"{work}/cpu-stats/stats.npz"), np.load(f"{work}/gpu-stats/stats.npz")
for key in sorted(a.files):
    x, y = a[key], b[key]
    rel = np.abs(x - y).max() / max(np.abs(x).max(), 1e-30)
    print(f"stats {key:<14} {'equal' if np.array_equal(x, y) else f'max rel diff {rel:.2e}'}")
ea, eb = (json.load(open(f"{work}/{d}/evaluation.json")) for d in ("cpu-eval", "gpu-eval"))
print("evaluate targets equal:", ea["targets"] == eb["targets"])
for m, row in ea["table"].items():
    for k in ("deletion_auc", "insertion_auc", "average_drop", "increase_in_confidence"):
        print(f"evaluate {m:<8} {k:<22} cpu {row[k]:.6f} gpu {eb['table'][m][k]:.6f}")
EOF
