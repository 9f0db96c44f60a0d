# Shared by the GPU benchmark scripts (source it from the repo root): the wheels a GPU image
# lacks, their offline install, and stages that run under a timeout within a total budget.
#
# GPU_IMAGE_PACKAGES are what the GPU image has (with what they require), as
# ../shared/tools/gpu-image-venv.sh lists them; GPU_WHEEL_PINS are what the commands the GPU
# scripts run import on top of that (and those wheels' own requirements, since they install
# without their dependencies). tests/test_benchmarks_gpu.py holds the two lists to the import
# closure of those commands: a new dependency fails it until it is pinned here.
# `gpu_download_wheels` puts the pinned manylinux cp312 wheels in $WHEELS (default wheels/,
# git-ignored by its own .gitignore) where PyPI is reachable, with a copy of
# ../shared/imagenet-samples (the input benchmark's real JPEGs; they do not travel otherwise);
# `gpu_install_missing_wheels` installs from there, offline, only what $PYTHON cannot import,
# into a scratch folder put on PYTHONPATH.
#
# A script that sources this sets PYTHON, WHEELS, budget_s and log_dir, creates the scratch
# folder ($gpu_scratch, removed at exit by gpu_make_scratch's trap), then calls `gpu_stage NAME
# LIMIT_S COMMAND...` per stage and `gpu_finish` last. Each stage's output goes to the terminal
# and to $log_dir/NAME.log; its status (ok, TIMED OUT, FAILED, SKIPPED when the budget is
# spent) goes to the summary gpu_finish prints; gpu_finish exits 0 when every stage is ok.

GPU_IMAGE_PACKAGES=(jax jaxlib flax optax orbax-checkpoint numpy pillow absl-py msgpack
  matplotlib "etils[epath,epy]" protobuf psutil pyyaml cloudpickle tensorboard packaging torch
  torchvision)
GPU_WHEEL_PINS=(grain==0.2.18 array_record==0.8.6 ml_collections==1.1.0 portpicker==1.6.0
  simplejpeg==1.9.0 tensorboardX==2.6.5)
# The module each pin provides, in the same order (checked by the test).
GPU_WHEEL_MODULES=(grain array_record ml_collections portpicker simplejpeg tensorboardX)
GPU_SAMPLES="imagenet-samples"  # The folder in $WHEELS holding the copied sample JPEGs.
gpu_summary=()
gpu_start=$SECONDS

gpu_download_wheels() {  # Where PyPI is reachable: the pinned wheels into $WHEELS.
  "$PYTHON" -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$WHEELS" \
    "${GPU_WHEEL_PINS[@]}" || return 1
  printf '*\n' >"$WHEELS/.gitignore"  # The folder ignores itself: never committed.
  local samples=../shared/imagenet-samples
  if [ -d "$samples" ]; then
    rm -rf "${WHEELS:?}/$GPU_SAMPLES"
    cp -r "$samples" "$WHEELS/$GPU_SAMPLES"
  else
    echo "no $samples here: the input stage will use synthetic JPEGs on the GPU host"
  fi
  du -sh "$WHEELS"
}

gpu_make_scratch() {  # A scratch folder for installed wheels, removed when the script exits.
  gpu_scratch="$(mktemp -d)"
  trap 'rm -rf "$gpu_scratch"' EXIT
}

gpu_stage() {  # gpu_stage NAME LIMIT_S COMMAND...: runs COMMAND under its timeout, logs, records.
  local name="$1" limit="$2"
  shift 2
  local left=$((budget_s - (SECONDS - gpu_start)))
  if ((left < 10)); then
    gpu_summary+=("$name: SKIPPED (the ${budget_s} s budget is spent)")
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
  gpu_summary+=("$name: $status ($((SECONDS - t0)) s)")
}

gpu_missing_wheels() {  # The wheels in $WHEELS of the packages $PYTHON cannot import.
  local i
  for i in "${!GPU_WHEEL_MODULES[@]}"; do
    if ! "$PYTHON" -c "import importlib.util as u, sys; sys.exit(u.find_spec('${GPU_WHEEL_MODULES[$i]}') is None)"; then
      local pin="${GPU_WHEEL_PINS[$i]}" found
      # A wheel's file name spells the project normalized: lower case, "_" for "-" and ".".
      local name="${pin%%==*}"
      name="${name//[-.]/_}"
      found="$(find "$WHEELS" -maxdepth 1 -iname "${name}-${pin#*==}-*.whl" 2>/dev/null | head -n1)"
      echo "${found:-absent:$pin}"
    fi
  done
}

gpu_install_missing_wheels() {  # gpu_install_missing_wheels LIMIT_S DOWNLOAD_COMMAND
  local wheels
  mapfile -t wheels < <(gpu_missing_wheels)
  if ((${#wheels[@]} == 0)); then
    gpu_summary+=("install: ok (every package importable already)")
  elif printf '%s\n' "${wheels[@]}" | grep -q '^absent:'; then
    echo "no wheel in $WHEELS/ for: $(printf '%s\n' "${wheels[@]}" | sed -n 's/^absent://p' | xargs)"
    echo "run '$2' where PyPI is reachable and bring $WHEELS/"
    gpu_summary+=("install: FAILED (wheels missing)")
  else
    local site="$gpu_scratch/site-packages"
    gpu_stage install "$1" "$PYTHON" -m pip install -q --no-index --no-deps --no-compile \
      --no-cache-dir --target "$site" "${wheels[@]}"
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
  fi
}

gpu_finish() {  # The summary; exit 0 when every stage passed, else 1.
  echo "== summary ($((SECONDS - gpu_start)) s of a ${budget_s} s budget; logs in $log_dir)"
  printf '  %s\n' "${gpu_summary[@]}"
  if printf '%s\n' "${gpu_summary[@]}" | grep -v ': ok' >/dev/null; then exit 1; fi
  exit 0
}
