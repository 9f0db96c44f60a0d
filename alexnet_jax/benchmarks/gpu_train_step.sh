#!/usr/bin/env bash
# The train step on a GPU against PyTorch on the same chip, in one command (issue 22): a profile
# of the paper net's bfloat16 step (its top operations), then one process per row of the
# comparison: JAX and PyTorch (eager, torch.compile) on the paper net in bfloat16 and TF32, the
# torchvision variant against torchvision's own alexnet, device memory of each; the kernel
# options (tuning.KernelOptions) timed against each other in one process; and the table
# (gpu_table.py, also written to LOG_DIR/table.md). Every stage has its own timeout and the
# whole run a budget (default 500 s, then the table: under 9 minutes on a warm host).
#
#   bash alexnet_jax/benchmarks/gpu_train_step.sh download       # with PyPI: the wheels to carry
#   bash alexnet_jax/benchmarks/gpu_train_step.sh --log_dir=DIR  # on the GPU host, repo root
#   bash alexnet_jax/benchmarks/gpu_train_step.sh --smoke        # anywhere: tiny net on the CPU
#
# The wheels are gpu.sh's (gpu_common.sh). Options: --batch_size=512 --steps=10 --budget_s=500
# --peak_tflops=0 --stage_timeout_s=N (every stage) --wheels=DIR (default wheels/)
# --skip_torch_compile; PYTHON=python3 picks the interpreter. Exit 0 when every stage passed.
# docs/gpu-train-step.md says what each stage answers and what to do with the numbers.
set -uo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=gpu_common.sh
source alexnet_jax/benchmarks/gpu_common.sh

PYTHON="${PYTHON:-python3}"
WHEELS="wheels"
smoke=0 log_dir="" batch=512 steps=10 budget_s=500 peak_tflops=0 stage_s="" compile=1 mode=run
for arg in "$@"; do
  case "$arg" in
    download) mode=download ;;
    --smoke) smoke=1 ;;
    --log_dir=*) log_dir="${arg#*=}" ;;
    --batch_size=*) batch="${arg#*=}" ;;
    --steps=*) steps="${arg#*=}" ;;
    --budget_s=*) budget_s="${arg#*=}" ;;
    --peak_tflops=*) peak_tflops="${arg#*=}" ;;
    --stage_timeout_s=*) stage_s="${arg#*=}" ;;
    --wheels=*) WHEELS="${arg#*=}" ;;
    --skip_torch_compile) compile=0 ;;
    *) echo "unknown argument: $arg (see the header of $0)" >&2; exit 2 ;;
  esac
done
if [ "$mode" = download ]; then gpu_download_wheels; exit; fi

export PYTHONUNBUFFERED=1
config=(--config=configs/imagenet.py)
matmul=8192 profile_at=4 profiled=5
# The kernel options timed in one process; the first is the baseline (none).
choices=("" lrn=compute_dtype max_pool=sliced tower_convs=grouped pad_input_channels=4
  pad_input_channels=8 lrn=compute_dtype,max_pool=sliced,tower_convs=grouped,pad_input_channels=8)
# Seconds: install, environment, profile, JAX step, torch eager, torch.compile, kernel options.
limits=(60 45 100 75 60 120 180)
if [ "$smoke" = 1 ]; then
  config+=(--config.model.width=0.0625 --config.model.num_classes=10)
  batch=2 steps=1 matmul=64 profile_at=2 profiled=1 budget_s=900
  choices=("" lrn=compute_dtype,max_pool=sliced,tower_convs=grouped,pad_input_channels=8)
  limits=(30 30 90 90 60 300 150)
  export ALEXNET_JAX_HOST_ALLOCATOR="${ALEXNET_JAX_HOST_ALLOCATOR:-system}"  # No restart.
fi
[ -n "$stage_s" ] && limits=("$stage_s" "$stage_s" "$stage_s" "$stage_s" "$stage_s" "$stage_s" "$stage_s")
log_dir="${log_dir:-$(mktemp -d)}"
mkdir -p "$log_dir"
gpu_make_scratch
gpu_start=$SECONDS

gpu_install_missing_wheels "${limits[0]}" "bash alexnet_jax/benchmarks/gpu_train_step.sh download"
gpu_stage environment "${limits[1]}" "$PYTHON" -m alexnet_jax.benchmarks.environment

bf16=(--config.model.compute_dtype=bfloat16)
gpu_stage profile_paper_bf16 "${limits[2]}" "$PYTHON" -m alexnet_jax.benchmarks.step_profile \
  "${config[@]}" "${bf16[@]}" --batch_size="$batch" \
  --config.diagnostics.profile_start_step="$profile_at" \
  --config.diagnostics.profile_num_steps="$profiled" --workdir="$log_dir/profile_run" \
  --json="$log_dir/profile_paper_bf16.json"

train=("$PYTHON" -m alexnet_jax.benchmarks.train_step "${config[@]}" --batch_sizes="$batch"
  --steps="$steps" --matmul_size="$matmul" --skip_layers --skip_eval --peak_tflops="$peak_tflops")
# A PyTorch process starts JAX only for the matmul peak: it must not reserve the device's memory.
torch_env=(env XLA_PYTHON_CLIENT_PREALLOCATE=false)
frameworks() {  # frameworks NAME DTYPE_FLAGS...: the JAX, eager and compiled rows of one net.
  local name="$1"
  shift
  gpu_stage "jax_$name" "${limits[3]}" "${train[@]}" "$@" --framework=jax \
    --json="$log_dir/jax_$name.json"
  gpu_stage "torch_$name" "${limits[4]}" "${torch_env[@]}" "${train[@]}" "$@" --framework=torch \
    --json="$log_dir/torch_$name.json"
  if [ "$compile" = 1 ] && [ "${with_compile:-1}" = 1 ]; then
    gpu_stage "torch_compile_$name" "${limits[5]}" "${torch_env[@]}" "${train[@]}" "$@" \
      --framework=torch_compile --json="$log_dir/torch_compile_$name.json"
  fi
}
frameworks paper_bf16 "${bf16[@]}"
options=()
for choice in "${choices[@]}"; do options+=("--options=$choice"); done
gpu_stage kernel_choices_paper_bf16 "${limits[6]}" "$PYTHON" -m \
  alexnet_jax.benchmarks.kernel_choices "${config[@]}" "${bf16[@]}" --batch_size="$batch" \
  --steps="$steps" "${options[@]}" --json="$log_dir/kernel_choices_paper_bf16.json"
frameworks torchvision_bf16 "${bf16[@]}" --config.model.variant=torchvision
with_compile=0 frameworks paper_f32  # TF32 on the GPU; no torch.compile row (the budget).

# The table reads the stages' JSON files: outside the budget, it takes a second.
budget_s=$((budget_s + 30))
gpu_stage table 30 "$PYTHON" -m alexnet_jax.benchmarks.gpu_table --stage_dir="$log_dir"
gpu_finish
