#!/usr/bin/env bash
# The GPU benchmark in one command: the paper's network (configs/imagenet.py), float32 and
# bfloat16 train steps at GPU-sized batches (images/s, fraction of the chip's peak, device
# memory), then the real input pipeline feeding the step. Every stage has its own timeout and
# the whole run a budget (default 460 s), so a hang is reported, not fatal, and a fresh host
# finishes within 8 minutes.
#
#   bash alexnet_jax/benchmarks/gpu.sh download         # with PyPI: wheels the GPU image lacks
#   bash alexnet_jax/benchmarks/gpu.sh --log_dir=DIR    # on the GPU host, from the repo root
#   bash alexnet_jax/benchmarks/gpu.sh --smoke          # anywhere: tiny network, batch 4 (a test)
#
# The GPU image (Python 3.12, jax, flax, optax, orbax-checkpoint) lacks grain, array_record,
# ml_collections and portpicker (grain's); `download` puts their manylinux cp312 wheels in
# wheels/ (about 4.4 MiB, git-ignored by its own .gitignore), and a run installs from there,
# offline, only what the interpreter cannot import. tensorflow-datasets is not needed: only
# `alexnet_jax.data.prepare --source=tfds:...` imports it (and its dependency promise ships no
# wheel). Options: --batch_sizes=256,512,1024 --steps=10 --budget_s=460 --peak_tflops=0
# (0 = the datasheet peak for the chip and dtype, see train_step.CHIP_PEAK_TFLOPS),
# --stage_timeout_s=N (every stage), --wheels=DIR (default wheels/); PYTHON=python3 picks the
# interpreter. Exit status 0 when every stage passed, else 1.
set -uo pipefail
cd "$(dirname "$0")/../.."

PYTHON="${PYTHON:-python3}"
WHEELS="wheels"
WHEEL_PINS=(grain==0.2.18 array_record==0.8.6 ml_collections==1.1.0 portpicker==1.6.0)
MODULES=(grain array_record ml_collections portpicker)  # Same order as WHEEL_PINS.

smoke=0 log_dir="" batch_sizes="256,512,1024" steps=10 budget_s=460 peak_tflops=0 stage_s=""
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

if [ "${mode:-}" = download ]; then
  "$PYTHON" -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$WHEELS" \
    "${WHEEL_PINS[@]}" || exit 1
  printf '*\n' >"$WHEELS/.gitignore"  # The folder ignores itself: never committed.
  du -sh "$WHEELS"
  exit 0
fi

export PYTHONUNBUFFERED=1
# The paper's network; GPU-sized batches; the pipeline decodes on every core.
config=(--config=configs/imagenet.py)
pipeline_batch=512 pipeline_threads="$(nproc)" samples=() fed_steps=20 matmul=8192
limits=(60 60 150 150 150)  # install, environment, f32, bf16, pipeline (seconds)
if [ "$smoke" = 1 ]; then
  config+=(--config.model.width=0.0625)
  batch_sizes=4 steps=1 budget_s=240 pipeline_batch=4 pipeline_threads=1
  samples=(--samples_dir= --synthetic_images=8)
  fed_steps=1 matmul=64 limits=(30 30 90 90 120)
  export ALEXNET_JAX_HOST_ALLOCATOR="${ALEXNET_JAX_HOST_ALLOCATOR:-system}"  # No restart.
fi
[ -n "$stage_s" ] && limits=("$stage_s" "$stage_s" "$stage_s" "$stage_s" "$stage_s")
log_dir="${log_dir:-$(mktemp -d)}"
scratch="$(mktemp -d)"  # Installed wheels and the compilation cache; removed at exit.
trap 'rm -rf "$scratch"' EXIT
# One fresh compilation cache per run: the train-step stages compile cold (their compile times
# are real) and the pipeline stage reuses the bf16 step they compiled.
export JAX_COMPILATION_CACHE_DIR="$scratch/jax_cache"
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0.5
mkdir -p "$log_dir"
start=$SECONDS
summary=()

stage() {  # stage NAME LIMIT_S COMMAND...: runs COMMAND under its timeout, logs, records.
  local name="$1" limit="$2"
  shift 2
  local left=$((budget_s - (SECONDS - start)))
  if ((left < 10)); then
    summary+=("$name: SKIPPED (the ${budget_s} s budget is spent)")
    return
  fi
  ((limit > left)) && limit=$left
  echo "== $name (timeout ${limit} s): $*"
  local t0=$SECONDS
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$log_dir/$name.log"
  local rc=${PIPESTATUS[0]} status=ok
  if ((rc == 124 || rc == 137)); then
    status="TIMED OUT after ${limit} s"
  elif ((rc != 0)); then
    status="FAILED (exit $rc; see $log_dir/$name.log)"
  fi
  summary+=("$name: $status ($((SECONDS - t0)) s)")
}

missing_wheels() {  # The wheels in wheels/ of the packages this interpreter cannot import.
  local i
  for i in "${!MODULES[@]}"; do
    if ! "$PYTHON" -c "import importlib.util as u, sys; sys.exit(u.find_spec('${MODULES[$i]}') is None)"; then
      ls "$WHEELS/${WHEEL_PINS[$i]%%==*}"-*.whl 2>/dev/null || echo "absent:${WHEEL_PINS[$i]}"
    fi
  done
}

mapfile -t wheels < <(missing_wheels)
if ((${#wheels[@]} == 0)); then
  summary+=("install: ok (every package importable already)")
elif printf '%s\n' "${wheels[@]}" | grep -q '^absent:'; then
  echo "no wheel in $WHEELS/ for: $(printf '%s\n' "${wheels[@]}" | sed -n 's/^absent://p' | xargs)"
  echo "run 'bash alexnet_jax/benchmarks/gpu.sh download' where PyPI is reachable and bring $WHEELS/"
  summary+=("install: FAILED (wheels missing)")
else
  site="$scratch/site-packages"
  stage install "${limits[0]}" "$PYTHON" -m pip install -q --no-index --no-deps --no-compile \
    --no-cache-dir --target "$site" "${wheels[@]}"
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi

stage environment "${limits[1]}" "$PYTHON" -m alexnet_jax.benchmarks.environment

train=("$PYTHON" -m alexnet_jax.benchmarks.train_step "${config[@]}" --framework=jax
  --batch_sizes="$batch_sizes" --steps="$steps" --matmul_size="$matmul" --skip_layers --skip_eval
  --peak_tflops="$peak_tflops")
stage train_step_f32 "${limits[2]}" "${train[@]}" --json="$log_dir/train_step_f32.json"
stage train_step_bf16 "${limits[3]}" "${train[@]}" --config.model.compute_dtype=bfloat16 \
  --json="$log_dir/train_step_bf16.json"
stage input_pipeline "${limits[4]}" "$PYTHON" -m alexnet_jax.benchmarks.input_pipeline \
  "${config[@]}" --config.model.compute_dtype=bfloat16 --config.batch_size="$pipeline_batch" \
  --config.data.num_threads="$pipeline_threads" "${samples[@]}" \
  --train_steps="$fed_steps" --rounds=3 --batches_per_round=2

echo "== summary ($((SECONDS - start)) s of a ${budget_s} s budget; logs in $log_dir)"
printf '  %s\n' "${summary[@]}"
if printf '%s\n' "${summary[@]}" | grep -v ': ok' >/dev/null; then exit 1; fi
exit 0
