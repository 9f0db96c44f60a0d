#!/usr/bin/env bash
# The GPU benchmark in one command: the paper's network (configs/imagenet.py), float32 and
# bfloat16 train steps at GPU-sized batches (images/s, fraction of the chip's peak, device
# memory); the training input feeding the step (worker by worker) and the validation pass; then
# launch.py end to end on generated ImageNet-shaped data (bfloat16, batch 512): a few hundred
# steps with a checkpoint and an evaluation, a resume to more steps, `evaluate` on the result,
# and the loop's own img/s and data_wait_fraction. Every stage has its own timeout and the whole
# run a budget (default 480 s), so a hang is reported, not fatal, and a fresh host finishes
# within one 9-minute call. docs/gpu.md says what each stage measures.
#
#   bash alexnet_jax/benchmarks/gpu.sh download         # with PyPI: wheels the GPU image lacks
#   bash alexnet_jax/benchmarks/gpu.sh --log_dir=DIR    # on the GPU host, from the repo root
#   bash alexnet_jax/benchmarks/gpu.sh --smoke          # anywhere: tiny network, tiny batches
#
# The wheels (and the sample JPEGs the input stage reads) are gpu_common.sh's. Options:
# --batch_sizes=512 (the train-step stages; e.g. 256,512,1024) --steps=10 --budget_s=480
# --peak_tflops=0 (0 = the datasheet peak for the chip and dtype, see
# train_step.CHIP_PEAK_TFLOPS) --stage_timeout_s=N (every stage) --wheels=DIR (default wheels/);
# PYTHON=python3 picks the interpreter. Exit status 0 when every stage passed, else 1.
set -uo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=gpu_common.sh
source alexnet_jax/benchmarks/gpu_common.sh

PYTHON="${PYTHON:-python3}"
WHEELS="wheels"
smoke=0 log_dir="" batch_sizes="512" steps=10 budget_s=480 peak_tflops=0 stage_s="" mode=run
for arg in "$@"; do
  case "$arg" in
    download) mode=download ;;
    --smoke) smoke=1 ;;
    --log_dir=*) log_dir="${arg#*=}" ;;
    --batch_sizes=*) batch_sizes="${arg#*=}" ;;
    --steps=*) steps="${arg#*=}" ;;
    --budget_s=*) budget_s="${arg#*=}" ;;
    --peak_tflops=*) peak_tflops="${arg#*=}" ;;
    --stage_timeout_s=*) stage_s="${arg#*=}" ;;
    --wheels=*) WHEELS="${arg#*=}" ;;
    *) echo "unknown argument: $arg (see the header of $0)" >&2; exit 2 ;;
  esac
done
if [ "$mode" = download ]; then gpu_download_wheels; exit; fi

export PYTHONUNBUFFERED=1
# The paper's network at full width; GPU-sized batches.
config=(--config=configs/imagenet.py)
matmul=8192
# The input stage: batch 512, worker counts up to 8 (and the automatic setting, cores - 1).
pipeline=(--config.batch_size=512 --max_workers=8 --train_steps=20 --rounds=3
  --batches_per_round=2)
# The training run: bfloat16, batch 512; first_steps, then a resume to all_steps.
loop_batch=512 first_steps=200 all_steps=300 log_every=50 eval_batch=256
loop_data=(--train_records=5120 --val_records=1024 --distinct_images=48)
# Seconds: install, environment, f32 step, bf16 step, input, then the training run's data,
# first launch, resume, evaluate, report.
limits=(30 30 60 60 120 40 110 80 50 20)
if [ "$smoke" = 1 ]; then
  config+=(--config.model.width=0.0625)
  batch_sizes=4 steps=1 matmul=64 budget_s=900
  pipeline=(--config.batch_size=4 --max_workers=1 --train_steps=1 --rounds=1
    --batches_per_round=1 --records=64 --val_records=32 --config.eval_batch_size=16)
  loop_batch=8 first_steps=6 all_steps=9 log_every=2 eval_batch=16
  loop_data=(--train_records=64 --val_records=32 --distinct_images=8)
  limits=(60 60 120 120 200 60 200 150 100 30)
  export ALEXNET_JAX_HOST_ALLOCATOR="${ALEXNET_JAX_HOST_ALLOCATOR:-system}"  # No restart.
fi
[ -n "$stage_s" ] && for i in "${!limits[@]}"; do limits[i]="$stage_s"; done
log_dir="${log_dir:-$(mktemp -d)}"
mkdir -p "$log_dir"
gpu_make_scratch
# One fresh compilation cache per run: the train-step stages compile cold (their compile times
# are real); the input stage reuses the bf16 step they compiled, the resume the first launch's.
export JAX_COMPILATION_CACHE_DIR="$gpu_scratch/jax_cache"
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0.5
gpu_start=$SECONDS

gpu_install_missing_wheels "${limits[0]}" "bash alexnet_jax/benchmarks/gpu.sh download"
gpu_stage environment "${limits[1]}" "$PYTHON" -m alexnet_jax.benchmarks.environment

bf16=(--config.model.compute_dtype=bfloat16)
train=("$PYTHON" -m alexnet_jax.benchmarks.train_step "${config[@]}" --framework=jax
  --batch_sizes="$batch_sizes" --steps="$steps" --matmul_size="$matmul" --skip_layers --skip_eval
  --peak_tflops="$peak_tflops")
gpu_stage train_step_f32 "${limits[2]}" "${train[@]}" --json="$log_dir/train_step_f32.json"
gpu_stage train_step_bf16 "${limits[3]}" "${train[@]}" "${bf16[@]}" \
  --json="$log_dir/train_step_bf16.json"

# The sample JPEGs travel in the wheels folder; without them the stage draws synthetic ones.
samples=()
[ -d "$WHEELS/$GPU_SAMPLES" ] && samples=(--samples_dir="$WHEELS/$GPU_SAMPLES")
gpu_stage input_pipeline "${limits[4]}" "$PYTHON" -m alexnet_jax.benchmarks.input_pipeline \
  "${config[@]}" "${bf16[@]}" "${pipeline[@]}" "${samples[@]}" \
  --json="$log_dir/input_pipeline.json"

# launch.py end to end. The dataset and the workdir (the paper net's checkpoints, ~0.7 GB
# each) stay in the scratch folder; the report and the evaluation come to the log dir.
data_dir="$gpu_scratch/synthetic_imagenet" workdir="$gpu_scratch/loop_run"
gpu_stage loop_data "${limits[5]}" "$PYTHON" -m alexnet_jax.benchmarks.synthetic_imagenet \
  --output_dir="$data_dir" "${loop_data[@]}"
launch=("$PYTHON" launch.py "${config[@]}" "${bf16[@]}" --config.data.dtype=bfloat16
  --workdir="$workdir" --config.data.dir="$data_dir" --config.batch_size="$loop_batch"
  --config.eval_batch_size="$eval_batch" --config.log_every_steps="$log_every"
  --config.eval_every_epochs=1000 --config.checkpoint_every_steps="$first_steps")
gpu_stage loop_train "${limits[6]}" "${launch[@]}" --config.max_steps="$first_steps"
gpu_stage loop_resume "${limits[7]}" "${launch[@]}" --config.max_steps="$all_steps"
gpu_stage loop_evaluate "${limits[8]}" "$PYTHON" -m alexnet_jax.evaluate --workdir="$workdir" \
  --ten_crop --batch_size="$eval_batch" --output="$log_dir/loop_evaluation.json"
gpu_stage loop_report "${limits[9]}" "$PYTHON" -m alexnet_jax.benchmarks.loop_report \
  --workdir="$workdir" --first_steps="$first_steps" --resume_log="$log_dir/loop_resume.log" \
  --json="$log_dir/loop.json"
cp "$workdir/metrics.jsonl" "$log_dir/loop_metrics.jsonl" 2>/dev/null  # The rows it read.
# The loop's numbers on the report's summary line (the report printed them).
loop_line="$(grep -h '^training loop:' "$log_dir/loop_report.log" 2>/dev/null)"
if [ -n "$loop_line" ]; then
  gpu_summary[${#gpu_summary[@]} - 1]+="; training loop: ${loop_line#training loop: }"
fi
gpu_finish
