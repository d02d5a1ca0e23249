#!/usr/bin/env bash
# Train SpeciaRL on one GPU VM on Compute Engine (one JAX process over all its GPUs), or serve the verifier
# there: create the VM, copy the project, install it with the `cuda` extra, start the trainer in the
# background, follow its log, delete. Every gcloud command can be printed instead of run (--dry-run).
# See launch/README.md for the recipe.
set -euo pipefail
PROG=gpu_vm.sh
# shellcheck source-path=SCRIPTDIR
# shellcheck source=_lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/_lib.sh"

usage() {
  cat <<'EOF'
Usage: launch/gpu_vm.sh SUBCOMMAND --name NAME --zone ZONE --project PROJECT [options] [-- ARGS...]

Subcommands:
  create    create the VM
  copy      copy the project to the VM (the local working tree, or a git clone with --source git)
  setup     wait for the NVIDIA driver, make .venv and `pip install -e ".[cuda]"` there
  train     start `python -m speciarl_jax.train --config=CONFIG ARGS...` in the background; ARGS after --
            are trainer flags such as --config.mesh.data=8
  verifier  install vLLM in .venv-vllm and serve the verifier with launch/verifier.sh serve in the
            background, then wait until it answers; ARGS after -- go to `verifier.sh serve`
            (e.g. -- --tensor-parallel-size 2)
  logs      follow the trainer's log (or the verifier's, with --process verifier)
  stop      SIGTERM the trainer (it saves the current step and exits), or the verifier
  exec      run the command given after -- on the VM, from the project folder
  status    describe the VM
  delete    delete the VM and its boot disk
  all       create, copy, setup, train, then logs

Required:
  --name NAME               VM name
  --zone ZONE               e.g. us-central1-a
  --project PROJECT         Google Cloud project id

Creating:
  --machine-type TYPE       default a2-ultragpu-1g (1 x A100 80GB). A2, A3 and G2 types come with their GPUs
                            (a2-ultragpu-4g, a3-highgpu-8g, ...); N1 types need --gpu-type and --gpu-count
  --gpu-type TYPE           accelerator for N1 machine types (e.g. nvidia-tesla-v100)
  --gpu-count N             how many of --gpu-type (default 1)
  --image-family FAMILY     boot image with CUDA drivers (default common-cu128-ubuntu-2204-nvidia-570)
  --image-project PROJECT   project of the image family (default deeplearning-platform-release)
  --boot-disk-size SIZE     default 500GB (weights, caches, checkpoints)
  --spot                    Spot provisioning (can be preempted; the trainer saves on SIGTERM)
  --spot-action STOP|DELETE what happens to a preempted Spot VM (default STOP: the disk and the run folder stay)
  --create-flag FLAG        extra flag for `gcloud compute instances create`, repeatable

Copying and installing:
  --source local|git        local (default): pack the working tree (tracked and untracked, minus what
                            .gitignore excludes) and copy it; git: clone --repo on the VM
  --repo URL                git URL for --source git
  --ref REF                 branch, tag or commit for --source git (default HEAD)
  --remote-dir DIR          project folder on the VM, relative to the home folder (default speciarl_jax)
  --python-version VER      Python for the virtual environments, provided by uv (default 3.12)

Training:
  --config PATH             trainer config, relative to the project (default configs/cub_grpo.py)
  --secret-env NAME         forward the local value of NAME, repeatable; VERIFIER_API_KEY, OPENAI_API_KEY
                            and HF_TOKEN are forwarded when set. Values go through the ssh session's stdin:
                            never on a command line, never in a file, masked in --dry-run
  --env KEY=VALUE           a plain environment variable, repeatable (printed as is). Default
                            XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 (JAX would otherwise reserve 75% of each GPU)
  --wait-verifier URL       before starting, wait until this verifier answers GET /v1/models
                            (launch/verifier.sh wait); give the same base_url as --config.verifier.base_url
  --verifier-key-env NAME   environment variable holding the verifier's API key (forwarded as a secret; with
                            the verifier subcommand it becomes the server's key)
  --verifier-timeout SEC    how long to wait for the verifier (default 1800)
  --verifier-model NAME     with --wait-verifier: also wait until the server lists this model (the trainer's
                            --config.verifier.model)
  --follow                  after train, follow the log (all does this anyway)

Verifier (the verifier subcommand):
  --verifier-port PORT      port of the vLLM server (default 8000)
  --vllm-version VER        pip version of vLLM to install (default: the latest)

Other:
  --process train|verifier  which background process logs and stop act on (default train)
  --dry-run                 print every command (gcloud, tar) and the remote scripts instead of running them
  -h, --help                this text

Examples:
  launch/gpu_vm.sh all --name speciarl-gpu --zone us-central1-a --project my-proj \
      --machine-type a3-highgpu-8g --spot -- --config.mesh.data=8 \
      --config.model.path=/home/me/models/Qwen2.5-VL-7B-Instruct
  launch/gpu_vm.sh verifier --name verifier-gpu --zone us-central1-a --project my-proj \
      --machine-type a2-ultragpu-2g --verifier-key-env VERIFIER_API_KEY -- --tensor-parallel-size 2
EOF
}

# ---- options (the shared ones are parsed by parse_vm_options in _lib.sh) ----

SUBCOMMANDS=" create copy setup train verifier logs stop exec status delete all "
VM_NOUN=VM ZONE_EXAMPLE=us-central1-a
MACHINE=a2-ultragpu-1g GPU_TYPE="" GPU_COUNT=1 GPU_COUNT_SET=0
IMAGE_FAMILY=common-cu128-ubuntu-2204-nvidia-570 IMAGE_PROJECT=deeplearning-platform-release
DISK=500GB SPOT_ACTION=STOP
VERIFIER_PORT=8000 VLLM_VERSION=""
PROCESS=train

parse_own_option() {
  case $1 in
    --machine-type) need_value "$@"; MACHINE=$2; OPT_WORDS=2 ;;
    --gpu-type) need_value "$@"; GPU_TYPE=$2; OPT_WORDS=2 ;;
    --gpu-count) need_value "$@"; check_int "$1" "$2"; GPU_COUNT=$2; GPU_COUNT_SET=1; OPT_WORDS=2 ;;
    --image-family) need_value "$@"; IMAGE_FAMILY=$2; OPT_WORDS=2 ;;
    --image-project) need_value "$@"; IMAGE_PROJECT=$2; OPT_WORDS=2 ;;
    --boot-disk-size) need_value "$@"; DISK=$2; OPT_WORDS=2 ;;
    --spot-action) need_value "$@"; SPOT_ACTION=$2; OPT_WORDS=2 ;;
    --verifier-port) need_value "$@"; check_int "$1" "$2"; VERIFIER_PORT=$2; OPT_WORDS=2 ;;
    --vllm-version) need_value "$@"; VLLM_VERSION=$2; OPT_WORDS=2 ;;
    --process) need_value "$@"; PROCESS=$2; OPT_WORDS=2 ;;
  esac
}

check_own_options() {
  [[ $SPOT_ACTION == STOP || $SPOT_ACTION == DELETE ]] || die "--spot-action must be STOP or DELETE, got '$SPOT_ACTION'"
  [[ $PROCESS == train || $PROCESS == verifier ]] || die "--process must be 'train' or 'verifier', got '$PROCESS'"
  [[ $GPU_COUNT_SET == 0 || -n $GPU_TYPE ]] ||
    die "--gpu-count needs --gpu-type (A2, A3 and G2 machine types come with their GPUs: pick the machine type instead)"
}

parse_vm_options "$@"

ssh_vm() {  # ssh_vm CMD
  run gcloud compute ssh "$NAME" "${LOC[@]}" --quiet --command="$1"
}

logfile() { if [[ $PROCESS == verifier ]]; then echo launch_logs/verifier.log; else echo launch_logs/train.log; fi; }
pidfile() { if [[ $PROCESS == verifier ]]; then echo launch_logs/verifier.pid; else echo launch_logs/train.pid; fi; }

# The Deep Learning VM images install the NVIDIA driver on first boot; setup waits for it.
# shellcheck disable=SC2016  # expanded by the remote shell
DRIVER_WAIT='for i in $(seq 90); do nvidia-smi >/dev/null 2>&1 && break; echo "$(hostname): waiting for the NVIDIA driver"; sleep 10; done
nvidia-smi --query-gpu=name,memory.total --format=csv || { echo "$(hostname): nvidia-smi fails: no NVIDIA driver on this image (see --image-family)" >&2; exit 1; }'

# ---- subcommands ----

do_create() {
  local extra=()
  [[ -n $GPU_TYPE ]] && extra+=(--accelerator="type=$GPU_TYPE,count=$GPU_COUNT")
  [[ $SPOT == 1 ]] && extra+=(--provisioning-model=SPOT --instance-termination-action="$SPOT_ACTION")
  run gcloud compute instances create "$NAME" "${LOC[@]}" --machine-type="$MACHINE" "${extra[@]}" \
    --image-family="$IMAGE_FAMILY" --image-project="$IMAGE_PROJECT" --boot-disk-size="$DISK" \
    --maintenance-policy=TERMINATE --metadata=install-nvidia-driver=True "${CREATE_FLAGS[@]}"
}

do_copy() {
  if [[ $SOURCE == git ]]; then
    ssh_vm "$(remote_clone_script "$REMOTE_DIR" "$REPO" "$REF")"
    return 0
  fi
  local tarball
  if [[ $DRY_RUN == 1 ]]; then
    tarball="/tmp/$TARBALL_NAME"
  else
    tarball="$(mktemp -d)/$TARBALL_NAME"
    # shellcheck disable=SC2064  # the path is fixed now, on purpose
    trap "rm -rf $(q "$(dirname "$tarball")")" EXIT
  fi
  make_tarball "$tarball"
  run gcloud compute scp "$tarball" "$NAME:$TARBALL_NAME" "${LOC[@]}" --quiet
  ssh_vm "$(remote_unpack_script "$REMOTE_DIR")"
}

do_setup() {
  ssh_vm "$(remote_setup_script "$REMOTE_DIR" cuda "$PYVER" "$DRIVER_WAIT")"
}

do_train() {
  local exports shown wait_cmd="" cmd script shown_script pair have_fraction=0
  for pair in "${PLAIN_ENV[@]}"; do [[ ${pair%%=*} == XLA_PYTHON_CLIENT_MEM_FRACTION ]] && have_fraction=1; done
  [[ $have_fraction == 1 ]] || PLAIN_ENV+=(XLA_PYTHON_CLIENT_MEM_FRACTION=0.95)
  exports=$(env_exports real)
  shown=$(env_exports shown)
  [[ -n $WAIT_VERIFIER ]] && wait_cmd=$(verifier_wait_cmd "$WAIT_VERIFIER" "$VERIFIER_TIMEOUT" "$VERIFIER_KEY_ENV" "$VERIFIER_MODEL")
  cmd=$(train_cmd "$CONFIG" "${EXTRA[@]}")
  # One process drives every GPU of the VM, so no jax.distributed variables are set.
  script=$(remote_launch_script "$REMOTE_DIR" launch_logs/train.log launch_logs/train.pid "$wait_cmd" "$cmd" "$exports")
  shown_script=$(remote_launch_script "$REMOTE_DIR" launch_logs/train.log launch_logs/train.pid "$wait_cmd" "$cmd" "$shown")
  run_stdin "$script" "$shown_script" gcloud compute ssh "$NAME" "${LOC[@]}" --quiet --command='bash -s'
}

do_verifier() {
  local exports shown serve script shown_script
  # Only the verifier's key goes to the server; the trainer's other secrets stay behind.
  local saved=("${SECRET_NAMES[@]}")
  SECRET_NAMES=()
  [[ -n $VERIFIER_KEY_ENV ]] && SECRET_NAMES=("$VERIFIER_KEY_ENV")
  exports=$(env_exports real)
  shown=$(env_exports shown)
  SECRET_NAMES=("${saved[@]}")
  if [[ -n $VERIFIER_KEY_ENV && -z ${!VERIFIER_KEY_ENV-} && $DRY_RUN == 0 ]]; then
    die "--verifier-key-env names $VERIFIER_KEY_ENV, which is unset or empty here"
  fi
  serve="bash launch/verifier.sh serve --vllm .venv-vllm/bin/vllm --port $VERIFIER_PORT"
  [[ -n $VERIFIER_KEY_ENV ]] && serve+=" --api-key-env $VERIFIER_KEY_ENV"
  local arg
  for arg in "${EXTRA[@]}"; do serve+=" $(q "$arg")"; done
  local wait_cmd
  wait_cmd=$(verifier_wait_cmd "http://127.0.0.1:$VERIFIER_PORT" "$VERIFIER_TIMEOUT" "$VERIFIER_KEY_ENV")
  local pkg=vllm
  [[ -n $VLLM_VERSION ]] && pkg="vllm==$VLLM_VERSION"
  make_verifier_script() {  # make_verifier_script EXPORTS
    cat <<EOF
set -euo pipefail
$1
$DRIVER_WAIT
cd $(q "$REMOTE_DIR")
mkdir -p launch_logs
export PATH="\$HOME/.local/bin:\$PATH"
if ! command -v uv >/dev/null 2>&1; then
  python3 -m pip install --user --quiet uv || curl -LsSf https://astral.sh/uv/install.sh | sh
fi
if [ ! -x .venv-vllm/bin/python ]; then uv venv --seed --python $(q "$PYVER") .venv-vllm; fi
.venv-vllm/bin/pip install --quiet $(q "$pkg")
if [ -f launch_logs/verifier.pid ] && kill -0 "\$(cat launch_logs/verifier.pid)" 2>/dev/null; then
  echo "\$(hostname): the verifier is already running (pid \$(cat launch_logs/verifier.pid))"
else
  setsid nohup $serve > launch_logs/verifier.log 2>&1 < /dev/null &
  echo \$! > launch_logs/verifier.pid
  echo "\$(hostname): verifier started (pid \$!), log $(q "$REMOTE_DIR")/launch_logs/verifier.log"
fi
$wait_cmd
EOF
  }
  script=$(make_verifier_script "$exports")
  shown_script=$(make_verifier_script "$shown")
  run_stdin "$script" "$shown_script" gcloud compute ssh "$NAME" "${LOC[@]}" --quiet --command='bash -s'
  note "the verifier listens on port $VERIFIER_PORT of $NAME's internal IP: trainer flags" \
    "--config.verifier.base_url=http://INTERNAL_IP:$VERIFIER_PORT/v1" \
    "${VERIFIER_KEY_ENV:+--config.verifier.api_key_env=$VERIFIER_KEY_ENV}"
}

do_logs() {
  ssh_vm "tail -n +1 -F $(q "$REMOTE_DIR")/$(logfile)"
}

do_stop() {
  local pf
  pf=$(pidfile)
  local what=trainer
  [[ $PROCESS == verifier ]] && what="verifier (vLLM)"
  ssh_vm "$(remote_stop_script "$REMOTE_DIR" "$pf" "$what")"
}

do_exec() { ssh_vm "cd $(q "$REMOTE_DIR") && ${EXTRA[*]}"; }

do_status() { run gcloud compute instances describe "$NAME" "${LOC[@]}"; }

do_delete() { run gcloud compute instances delete "$NAME" "${LOC[@]}" --quiet; }

follow_train_log() { PROCESS=train; do_logs; }

dispatch
