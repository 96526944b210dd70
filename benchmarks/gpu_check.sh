#!/usr/bin/env bash
# One lease of an NVIDIA GPU: the ~1B bf16 training throughput (MFU) with cuDNN attention and
# torch as the peer, then the GPU-only tests and the attention/matmul tests on the GPU, then peak
# memory per remat policy and the largest model that trains on the device (benchmarks/gpu_memory.py).
#
#   bash benchmarks/gpu_check.sh OUTDIR
#
# Expects jax with CUDA, flax, optax, orbax-checkpoint, torch, transformers and peft installed;
# missing packages come as wheels in .whl/ (on the lent H200s here: ml_collections, and for the
# LoRA stages, which build the model through the trainer's loop, grain and its array-record and
# portpicker), fetched on this side for the device's Python 3.12:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl \
#     ml_collections==1.1.0 grain==0.2.18 array-record==0.8.6 portpicker==1.6.0
# Use the flax that matches the installed jax: flax 0.12.8 fails to import under jax 0.11.2. Each
# stage has its own time limit so that one stuck stage leaves the others' numbers; logs and JSON
# land in OUTDIR. All stages take more than one 15-minute lease:
# STAGES="lora_1b gpu_tests" bash benchmarks/gpu_check.sh OUTDIR runs only those.
set -u
out=${1:-/tmp/gpu_check}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
  rm -rf /tmp/site && python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
python3 -c "import jax, flax, optax, torch, transformers; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__, jax.devices())"

stage() {  # stage NAME SECONDS COMMAND...: runs it, keeps its log, says how it ended
  local name=$1 limit=$2
  shift 2
  if [[ -n "${STAGES:-}" && " $STAGES " != *" $name "* ]]; then
    echo "=== $name: skipped (not in STAGES)"
    return
  fi
  echo "=== $name (limit ${limit}s)"
  local start=$SECONDS
  timeout "$limit" "$@" >"$out/$name.log" 2>&1
  local rc=$?
  echo "=== $name: rc=$rc after $((SECONDS - start))s"
  tail -n 25 "$out/$name.log"
}

stage bench_1b_cudnn 300 python3 benchmarks/train_throughput.py --preset=1b --variants=bf16 --devices=1 \
  --steps=10 --warmup=2 --json="$out/bench_1b_cudnn.json"
# The ~1B step scanned (the default from 8 layers on since 2026-12-01) against unrolled (what the
# November MFU rows ran): the 2026-12-04 full-fine-tuning row was 8% under them.
stage scan_1b 300 python3 benchmarks/scan_layers.py --presets=1b --dtype=bfloat16
# Issue 16: LoRA r=16 on every projection of the ~1B Llama (bf16 compute) against full
# fine-tuning and PEFT + torch on the same GPU: train state, peak device memory, step time
# (four child processes: 254 s on an H200 on 2026-12-04).
stage lora_1b 420 python3 benchmarks/lora_memory.py --presets=1b --dtype=bfloat16 --malloc=reuse \
  --steps=5 --windows=3 --warmup=2 --json="$out/lora_1b.json"
# The same LoRA row with the frozen base held in bf16 (did not finish within 100 s on 2026-12-04:
# this limit leaves room, and PYTHONFAULTHANDLER makes a timeout's SIGABRT print where it was).
# (--child: one row in this process, its JSON printed after; compare with lora_1b's float32-base row.)
PYTHONFAULTHANDLER=1 XLA_PYTHON_CLIENT_PREALLOCATE=false stage lora_1b_bf16_base 240 bash -c \
  "timeout -s ABRT 230 python3 benchmarks/lora_memory.py --dtype=bfloat16 --frozen_dtype=bfloat16 --steps=5 --windows=3 \
  --warmup=2 --child='1b|flan_jax LoRA|$out/lora_1b_bf16_base.json' && cat $out/lora_1b_bf16_base.json"
# Where the LoRA step's time goes: one projection's forward + backward per shape of the ~1B model,
# full fine-tuning against LoRA (merged, as flan_jax runs it, and PEFT's unmerged form).
stage lora_projection 200 bash -c "python3 benchmarks/lora_projection.py --preset=1b --json=$out/lora_projection.json \
  && python3 benchmarks/lora_projection.py --preset=1b --frozen_dtype=bfloat16 --json=$out/lora_projection_bf16_base.json"
stage gpu_tests 90 python3 -m pytest -q -p no:cacheprovider -rA tests/test_gpu.py tests/test_matmul.py tests/test_causal_block_attention.py
# Issue 21 item 4: the FSDP gradient reduction as XLA:GPU compiles it (8 mock GPUs on this one; compile only).
stage gpu_collectives 180 python3 benchmarks/gpu_collectives.py --json="$out/gpu_collectives.json"
# Issue 21: peak memory of the 1B step at seq 4096 per remat policy, then the largest preset that
# trains on this one device (remat full) and its MFU.
stage memory_1b_remat 420 python3 benchmarks/gpu_memory.py --seq_len=4096 --batch=8 --json="$out/memory_1b_remat.json"
stage largest_model 420 python3 benchmarks/gpu_memory.py --largest --seq_len=4096 --batch=2 --json="$out/largest_model.json"
