#!/usr/bin/env bash
# The GPU measurements, in runs of under 10 minutes each on an H100/H200: the Qwen2.5-VL-3B and
# Qwen3-VL-8B architectures with random bf16 weights, nothing downloaded. Uses the machine's own torch and
# transformers; the package is read from src/ (no install needed). The log goes to stdout and to
# $OUT/gpu_check[_compiled].log when OUT is set.
#
#   bash benchmarks/gpu_check.sh            # eager: batched pass vs loop vs generate(), training memory
#   bash benchmarks/gpu_check.sh compiled   # latent_compile (inference step, training step) and
#                                           # compiled static-cache generation against transformers' own
#   bash benchmarks/gpu_check.sh qwen3      # the Qwen3-VL-8B architecture: latent pass, training step
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH=src PYTHONUNBUFFERED=1
part=${1:-eager}
case "$part" in
  eager) log=${OUT:-/tmp}/gpu_check.log ;;
  compiled) log=${OUT:-/tmp}/gpu_check_compiled.log ;;
  qwen3) log=${OUT:-/tmp}/gpu_check_qwen3.log ;;
  *) echo "usage: bash benchmarks/gpu_check.sh [eager|compiled|qwen3]" >&2; exit 2 ;;
esac
{
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
  python -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
  if [ "$part" = eager ]; then
    echo "== latent pass vs per-sample loop vs generate(), stage C"
    timeout 200 python benchmarks/latent_pass.py --model 3b --stage C --repeats 2
    echo "== the same, stage A"
    timeout 170 python benchmarks/latent_pass.py --model 3b --stage A --repeats 2
    echo "== pass 1 training memory: K/V store vs growing cache"
    timeout 150 python benchmarks/latent_memory.py --model 3b --batch 4 --prompts 2048 --steps 16 64 --repeats 1
  elif [ "$part" = qwen3 ]; then
    echo "== Qwen3-VL-8B: latent pass vs per-sample loop vs generate(), stage C"
    timeout 240 python benchmarks/latent_pass.py --model 8b --stage C --repeats 2
    echo "== Qwen3-VL-8B: training step, stage A and C vs plain CE, eager vs latent_compile (8 of 36 layers)"
    timeout 200 python benchmarks/train_step.py --model 8b --layers 8 --batch 4 --no-inference --repeats 2
    echo "== Qwen3-VL-8B: pass 1 training memory, K/V store vs growing cache"
    timeout 120 python benchmarks/latent_memory.py --model 8b --layers 8 --batch 4 --prompts 2048 --steps 16 64 --repeats 1
  else
    echo "== latent step without gradient, batch 8, eager vs latent_compile (36 layers; floor 1.32 ms on an H200)"
    timeout 270 python benchmarks/train_step.py --model 3b --no-training --repeats 2
    echo "== training step, stage A and C vs plain CE, eager vs latent_compile (8 of 36 text layers: ratios)"
    timeout 150 python benchmarks/train_step.py --model 3b --layers 8 --batch 4 --no-inference --repeats 2
    echo "== generation per token: static cache compiled vs eager vs transformers' own (12 of 36 layers: ratios)"
    timeout 150 python benchmarks/generation.py --model 3b --layers 12 --repeats 2 --tokens 8 40
  fi
} 2>&1 | tee "$log"
