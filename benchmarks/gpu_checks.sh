#!/usr/bin/env bash
# autoft's CUDA checks on a lent GPU machine (the device tool), after benchmarks/gpu_prepare.sh here:
#   1. the CUDA tests (tests/test_devices.py, tests/test_gpu_memory.py, tests/test_latency.py; Ray is not there),
#   2. benchmarks/bench_gpu.py on an ImageNet backbone at 224 px (mobilenet_v2, the weights that travel),
#   3. benchmarks/profile_gpu.py: where a trial's time goes on real photos,
#   4. an end-to-end `autoft search` of the ants/bees photos on the GPU (train/ split into train/val/test).
# Everything it writes goes to $OUT (8 files at most come back): env.txt, pytest.log, bench.log, gpu.json,
# profile.txt, search.log, trials.csv, summary.txt (profile.log when it fails). Steps are time-boxed so the whole run ends inside one 10-minute call.
set -u
OUT=${OUT:-/tmp/gpu-out}; mkdir -p "$OUT"
PY=python3
$PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD AUTOFT_HOME=$PWD/.gpu/assets AUTOFT_OFFLINE=1 PYTHONUNBUFFERED=1
export AUTOFT_TEST_TEXT_BACKBONE=/tmp/minilm-random
STEPS=${STEPS:-tests bench profile search}
{ nvidia-smi; $PY -c "import torch, torchvision, optuna, pydantic, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'torchvision', torchvision.__version__, 'optuna', optuna.__version__, 'pydantic', pydantic.__version__, 'transformers', transformers.__version__); print(torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0))"; nproc; } > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
# MiniLM's architecture and tokenizer with random weights (a bare folder: safetensors, not hash-checked)
cp -r .gpu/minilm /tmp/minilm-random
$PY -c "
from transformers import AutoConfig, AutoModel
m = AutoModel.from_config(AutoConfig.from_pretrained('/tmp/minilm-random'))
m.save_pretrained('/tmp/minilm-random', safe_serialization=True)" 2>&1 | tail -2

if [[ " $STEPS " == *" tests "* ]]; then
  echo "== CUDA tests"
  timeout ${TESTS_S:-240} $PY -m pytest -q -p no:cacheprovider tests/test_devices.py tests/test_gpu_memory.py \
      tests/test_latency.py -k "not ray" -o addopts="-ra" 2>&1 | tee "$OUT/pytest.log" | tail -30
fi
if [[ " $STEPS " == *" bench "* ]]; then
  echo "== bench_gpu.py"
  timeout ${BENCH_S:-200} $PY benchmarks/bench_gpu.py --backbone ${BENCH_BACKBONE:-mobilenet_v2_folded} \
      --out "$OUT/gpu.json" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.log" | grep "^\[\|throughput\|ratio\|speedup\|images_per_s\|Error"; echo "bench exit ${PIPESTATUS[0]}"
fi
if [[ " $STEPS " == *" profile "* ]]; then
  echo "== profile_gpu.py (real photos)"
  timeout ${PROFILE_S:-150} $PY benchmarks/profile_gpu.py --folder .gpu/assets/data/hymenoptera/train \
      --out "$OUT/profile.txt" > "$OUT/profile.log" 2>&1; echo "profile exit $?"; grep -v "^ " "$OUT/profile.log" | head -12
  AUTOFT_CUDNN_BENCHMARK=0 timeout ${PROFILE_S:-150} $PY benchmarks/profile_gpu.py --folder .gpu/assets/data/hymenoptera/train \
      > "$OUT/profile_nobench.txt" 2>&1; echo "profile (cudnn.benchmark off) exit $?"; grep -v "^ " "$OUT/profile_nobench.txt" | head -12
fi
if [[ " $STEPS " == *" search "* ]]; then
  echo "== autoft search on the GPU (ants/bees photos)"
  mkdir -p /tmp/gpu-task
  cat > /tmp/gpu-task/ants-bees-gpu.yaml <<YAML
name: ants-bees-gpu
modality: image
data: {source: image_folder, path: $PWD/.gpu/assets/data/hymenoptera/train}
metric: accuracy
split: {val: 0.25, test: 0.2, seed: 0}
budget: {n_trials: 16, max_epochs: 4, timeout: ${SEARCH_S:-150}}
search_space: imagenet_convnets
pruner: hyperband
seed: 0
device: cuda
YAML
  timeout $(( ${SEARCH_S:-150} + 60 )) $PY -m autoft.cli search --task /tmp/gpu-task/ants-bees-gpu.yaml \
      --backbones mobilenet_v2_folded,squeezenet1_1_folded --results-dir /tmp/gpu-results > "$OUT/search.log" 2>&1
  echo "search exit $?"; tail -40 "$OUT/search.log"
  f=$(find /tmp/gpu-results -name trials.csv | head -1); [ -n "$f" ] && cp "$f" "$OUT/trials.csv"
  { find /tmp/gpu-results -maxdepth 4 | head -50; r=$(find /tmp/gpu-results -name report.md | head -1); [ -n "$r" ] && cat "$r"; } > "$OUT/summary.txt" 2>&1
fi
