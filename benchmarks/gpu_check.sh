#!/usr/bin/env bash
# The GPU measurements in one run (about 5-8 minutes on an H100/H200): the Qwen2.5-VL-3B architecture
# with random bf16 weights, nothing downloaded. Uses the machine's own torch and transformers; the
# package is read from src/ (no install needed). The log goes to stdout and to $OUT/gpu_check.log
# when OUT is set.
#
#   bash benchmarks/gpu_check.sh
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH=src PYTHONUNBUFFERED=1
log=${OUT:-/tmp}/gpu_check.log
{
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
  python -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
  echo "== latent pass vs per-sample loop vs generate(), stage C"
  timeout 200 python benchmarks/latent_pass.py --model 3b --stage C --repeats 2
  echo "== the same, stage A"
  timeout 170 python benchmarks/latent_pass.py --model 3b --stage A --repeats 2
  echo "== pass 1 training memory: K/V store vs growing cache"
  timeout 150 python benchmarks/latent_memory.py --model 3b --batch 4 --prompts 2048 --steps 16 64 --repeats 1
} 2>&1 | tee "$log"
