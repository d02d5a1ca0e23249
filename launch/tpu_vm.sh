#!/usr/bin/env bash
# Train SpeciaRL on a Cloud TPU VM or a multi-host TPU slice: create the TPU, copy the project to every worker,
# install it with the `tpu` extra, start the trainer on all workers together, follow worker 0's log, delete.
# Every gcloud command can be printed instead of run (--dry-run). See launch/README.md for the recipe.
set -euo pipefail
PROG=tpu_vm.sh
# shellcheck source-path=SCRIPTDIR
# shellcheck source=_lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/_lib.sh"

usage() {
  cat <<'EOF'
Usage: launch/tpu_vm.sh SUBCOMMAND --name NAME --zone ZONE --project PROJECT [options] [-- ARGS...]

Subcommands:
  create    create the TPU VM / slice (directly, or through a queued resource with --queued)
  copy      copy the project to every worker (the local working tree, or a git clone with --source git)
  setup     make .venv on every worker and `pip install -e ".[tpu]"` there
  train     start `python -m speciarl_jax.train --config=CONFIG ARGS...` on all workers at once, in the
            background; ARGS after -- are trainer flags such as --config.mesh.data=8
  logs      follow a worker's trainer log (worker 0 unless --worker)
  stop      SIGTERM the trainer on every worker: the workers finish the step, all save it and exit
            (a preemption notice to a single worker has the same effect: the trainers agree each step)
  exec      run the command given after -- on every worker, from the project folder
  status    describe the TPU (or the queued resource)
  delete    delete the TPU VM (with --queued: the queued resource and its TPU)
  all       create, copy, setup, train, then logs

Required:
  --name NAME               TPU VM name (the node id under --queued)
  --zone ZONE               e.g. us-east5-a
  --project PROJECT         Google Cloud project id

Creating:
  --accelerator-type TYPE   e.g. v5p-16, v6e-16, v4-32 (required by create and all)
  --runtime-version VER     TPU software version; default by TPU generation: v6e v2-alpha-tpuv6e,
                            v5p v2-alpha-tpuv5, v5e (v5litepod) v2-alpha-tpuv5-lite, v4 and older
                            tpu-ubuntu2204-base
  --spot                    Spot capacity (can be preempted; the trainer saves on SIGTERM)
  --queued                  create through a queued resource and wait until it is ACTIVE; pass it to
                            status and delete as well
  --queued-id ID            queued resource id (default NAME-qr)
  --wait-timeout SEC        how long create waits for a queued resource (default 7200)
  --create-flag FLAG        extra flag for the gcloud create command, repeatable
                            (e.g. --create-flag=--network=my-net)

Copying and installing:
  --source local|git        local (default): pack the working tree (tracked and untracked, minus what
                            .gitignore excludes) and copy it; git: clone --repo on every worker
  --repo URL                git URL for --source git
  --ref REF                 branch, tag or commit for --source git (default HEAD)
  --remote-dir DIR          project folder on the workers, relative to the home folder (default speciarl_jax)
  --python-version VER      Python for the worker virtual environment, provided by uv (default 3.12)

Training:
  --config PATH             trainer config, relative to the project (default configs/cub_grpo.py)
  --secret-env NAME         forward the local value of NAME to the trainer, repeatable; VERIFIER_API_KEY,
                            OPENAI_API_KEY and HF_TOKEN are forwarded when set. Values go through the ssh
                            session's stdin: never on a command line, never in a file, masked in --dry-run
  --env KEY=VALUE           a plain environment variable for the trainer, repeatable (printed as is)
  --wait-verifier URL       before starting, every worker waits until this verifier answers GET /v1/models
                            (launch/verifier.sh wait); give the same base_url as --config.verifier.base_url
  --verifier-key-env NAME   environment variable holding the verifier's API key (forwarded as a secret)
  --verifier-timeout SEC    how long to wait for the verifier (default 1800)
  --verifier-model NAME     with --wait-verifier: also wait until the server lists this model (the trainer's
                            --config.verifier.model)
  --coordinator-port PORT   port of the jax.distributed coordinator on worker 0 (default 8476)
  --follow                  after train, follow worker 0's log (all does this anyway)

Other:
  --worker N                worker whose log `logs` follows (default 0)
  --num-workers N           --dry-run only: how many workers to show (a real run asks gcloud; default 1)
  --dry-run                 print every command (gcloud, tar) and the remote scripts instead of running them
  -h, --help                this text

Multi-host: the trainer reads JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID
(speciarl_jax/train.py); on a slice with several workers `train` sets them per worker (worker 0's internal
IP and --coordinator-port, the worker count, the worker index). A single-worker TPU gets none.

Examples:
  launch/tpu_vm.sh all --name speciarl --zone us-east5-a --project my-proj --accelerator-type v5p-16 \
      --spot -- --config.model.path=/home/me/models/Qwen2.5-VL-7B-Instruct --config.mesh.data=8
  launch/tpu_vm.sh logs --name speciarl --zone us-east5-a --project my-proj
  launch/tpu_vm.sh delete --name speciarl --zone us-east5-a --project my-proj
EOF
}

# ---- options (the shared ones are parsed by parse_vm_options in _lib.sh) ----

SUBCOMMANDS=" create copy setup train logs stop exec status delete all "
VM_NOUN="TPU VM" ZONE_EXAMPLE=us-east5-a
ACCEL="" RUNTIME="" QUEUED=0 QUEUED_ID="" WAIT_TIMEOUT=7200
COORD_PORT=8476 WORKER=0 NUM_WORKERS=1

parse_own_option() {
  case $1 in
    --accelerator-type) need_value "$@"; ACCEL=$2; OPT_WORDS=2 ;;
    --runtime-version) need_value "$@"; RUNTIME=$2; OPT_WORDS=2 ;;
    --queued) QUEUED=1; OPT_WORDS=1 ;;
    --queued-id) need_value "$@"; QUEUED_ID=$2; OPT_WORDS=2 ;;
    --wait-timeout) need_value "$@"; check_int "$1" "$2"; WAIT_TIMEOUT=$2; OPT_WORDS=2 ;;
    --coordinator-port) need_value "$@"; check_int "$1" "$2"; COORD_PORT=$2; OPT_WORDS=2 ;;
    --worker) need_value "$@"; check_int "$1" "$2"; WORKER=$2; OPT_WORDS=2 ;;
    --num-workers) need_value "$@"; check_int "$1" "$2"; NUM_WORKERS=$2; OPT_WORDS=2 ;;
  esac
}

check_own_options() {
  [[ $NUM_WORKERS -ge 1 ]] || die "--num-workers must be at least 1"
  [[ -n $QUEUED_ID ]] || QUEUED_ID="$NAME-qr"
}

parse_vm_options "$@"
# shellcheck disable=SC2016  # $(hostname) is expanded on the worker: one file per host, even on a shared disk
PIDFILE='launch_logs/train.$(hostname).pid'

# default_runtime TYPE: sets RUNTIME from the TPU generation (a function, not $(...), so die exits the script).
default_runtime() {
  case $1 in
    v6e-*) RUNTIME=v2-alpha-tpuv6e ;;
    v5p-*) RUNTIME=v2-alpha-tpuv5 ;;
    v5litepod-* | v5e-*) RUNTIME=v2-alpha-tpuv5-lite ;;
    v2-* | v3-* | v4-*) RUNTIME=tpu-ubuntu2204-base ;;
    *) die "no default runtime for --accelerator-type '$1': pass --runtime-version" ;;
  esac
}

# ssh_all CMD: one command on every worker at once.
ssh_all() {
  run gcloud compute tpus tpu-vm ssh "$NAME" "${LOC[@]}" --worker=all --quiet --command="$1"
}

# ---- subcommands ----

do_create() {
  [[ -n $ACCEL ]] || die "create needs --accelerator-type (e.g. v5p-16)"
  [[ -n $RUNTIME ]] || default_runtime "$ACCEL"
  local runtime=$RUNTIME
  local spot=()
  [[ $SPOT == 1 ]] && spot=(--spot)
  if [[ $QUEUED == 0 ]]; then
    run gcloud compute tpus tpu-vm create "$NAME" "${LOC[@]}" --accelerator-type="$ACCEL" \
      --version="$runtime" "${spot[@]}" "${CREATE_FLAGS[@]}"
    return 0
  fi
  run gcloud compute tpus queued-resources create "$QUEUED_ID" --node-id="$NAME" "${LOC[@]}" \
    --accelerator-type="$ACCEL" --runtime-version="$runtime" "${spot[@]}" "${CREATE_FLAGS[@]}"
  local describe=(gcloud compute tpus queued-resources describe "$QUEUED_ID" "${LOC[@]}" --format='value(state.state)')
  if [[ $DRY_RUN == 1 ]]; then
    printf '+ %s   # repeated until ACTIVE (at most %ss)\n' "$(qall "${describe[@]}")" "$WAIT_TIMEOUT"
    return 0
  fi
  local start=$SECONDS state=""
  while true; do
    state=$("${describe[@]}" 2>/dev/null || true)
    case $state in
      ACTIVE) note "queued resource $QUEUED_ID is ACTIVE"; return 0 ;;
      FAILED | SUSPENDED | SUSPENDING)
        printf '%s: error: queued resource %s is %s; see: %s\n' "$PROG" "$QUEUED_ID" "$state" \
          "gcloud compute tpus queued-resources describe $QUEUED_ID --zone=$ZONE --project=$PROJECT" >&2
        exit 1 ;;
    esac
    if (( SECONDS - start > WAIT_TIMEOUT )); then
      printf '%s: error: queued resource %s still %s after %ss (--wait-timeout); it stays queued: delete it with the delete subcommand and --queued\n' \
        "$PROG" "$QUEUED_ID" "${state:-unknown}" "$WAIT_TIMEOUT" >&2
      exit 1
    fi
    note "queued resource $QUEUED_ID: ${state:-unknown}; waiting"
    sleep 30
  done
}

do_copy() {
  if [[ $SOURCE == git ]]; then
    ssh_all "$(remote_clone_script "$REMOTE_DIR" "$REPO" "$REF")"
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
  run gcloud compute tpus tpu-vm scp "$tarball" "$NAME:$TARBALL_NAME" "${LOC[@]}" --worker=all --quiet
  ssh_all "$(remote_unpack_script "$REMOTE_DIR")"
}

do_setup() {
  ssh_all "$(remote_setup_script "$REMOTE_DIR" tpu "$PYVER")"
}

WORKER_IPS=()
find_workers() {
  local describe=(gcloud compute tpus tpu-vm describe "$NAME" "${LOC[@]}" --format=json)
  if [[ $DRY_RUN == 1 ]]; then
    printf '+ %s   # worker count and internal IPs\n' "$(qall "${describe[@]}")"
    local i
    for ((i = 0; i < NUM_WORKERS; i++)); do WORKER_IPS+=("WORKER${i}_IP"); done
    return 0
  fi
  local ips
  ips=$("${describe[@]}" | python3 -c '
import json, sys
node = json.load(sys.stdin)
print(" ".join(e.get("ipAddress", "") for e in node.get("networkEndpoints", [])))') ||
    die "could not describe TPU '$NAME' in $ZONE / $PROJECT (does it exist? see the status subcommand)"
  read -r -a WORKER_IPS <<<"$ips"
  [[ ${#WORKER_IPS[@]} -gt 0 && -n ${WORKER_IPS[0]} ]] || die "TPU '$NAME' reports no worker endpoints yet"
}

do_train() {
  find_workers
  local n=${#WORKER_IPS[@]} exports shown wait_cmd="" cmd i
  exports=$(env_exports real)
  shown=$(env_exports shown)
  [[ -n $WAIT_VERIFIER ]] && wait_cmd=$(verifier_wait_cmd "$WAIT_VERIFIER" "$VERIFIER_TIMEOUT" "$VERIFIER_KEY_ENV" "$VERIFIER_MODEL")
  cmd=$(train_cmd "$CONFIG" "${EXTRA[@]}")
  note "starting the trainer on $n worker(s) of $NAME"
  local pids=() failed=0
  for ((i = 0; i < n; i++)); do
    local dist=""
    if ((n > 1)); then
      dist="export JAX_COORDINATOR_ADDRESS=${WORKER_IPS[0]}:$COORD_PORT JAX_NUM_PROCESSES=$n JAX_PROCESS_ID=$i"
    fi
    local log="launch_logs/worker$i.log"
    local script shown_script
    script=$(remote_launch_script "$REMOTE_DIR" "$log" "$PIDFILE" "$wait_cmd" "$cmd" "$exports"$'\n'"$dist")
    shown_script=$(remote_launch_script "$REMOTE_DIR" "$log" "$PIDFILE" "$wait_cmd" "$cmd" "$shown"$'\n'"$dist")
    if [[ $DRY_RUN == 1 ]]; then
      run_stdin "$script" "$shown_script" gcloud compute tpus tpu-vm ssh "$NAME" "${LOC[@]}" --worker="$i" \
        --quiet --command='bash -s'
    else
      # One ssh per worker, all in flight together: the secrets reach each worker on its own stdin, which
      # gcloud's --worker=all cannot give (its parallel sessions share one stdin).
      run_stdin "$script" "" gcloud compute tpus tpu-vm ssh "$NAME" "${LOC[@]}" --worker="$i" \
        --quiet --command='bash -s' &
      pids+=($!)
    fi
  done
  for i in "${!pids[@]}"; do
    wait "${pids[$i]}" || { note "worker $i: the launch failed (see above)"; failed=1; }
  done
  if [[ $failed == 1 ]]; then
    note "some workers did not start; run the stop subcommand before trying again"
    exit 1
  fi
}

do_logs() {
  run gcloud compute tpus tpu-vm ssh "$NAME" "${LOC[@]}" --worker="$WORKER" --quiet \
    --command="tail -n +1 -F $(q "$REMOTE_DIR")/launch_logs/worker$WORKER.log"
}

do_stop() { ssh_all "$(remote_stop_script "$REMOTE_DIR" "$PIDFILE" trainer)"; }

do_exec() { ssh_all "cd $(q "$REMOTE_DIR") && ${EXTRA[*]}"; }

do_status() {
  if [[ $QUEUED == 1 ]]; then
    run gcloud compute tpus queued-resources describe "$QUEUED_ID" "${LOC[@]}"
  else
    run gcloud compute tpus tpu-vm describe "$NAME" "${LOC[@]}"
  fi
}

do_delete() {
  if [[ $QUEUED == 1 ]]; then
    run gcloud compute tpus queued-resources delete "$QUEUED_ID" "${LOC[@]}" --force --quiet
  else
    run gcloud compute tpus tpu-vm delete "$NAME" "${LOC[@]}" --quiet
  fi
}

follow_train_log() { WORKER=0; do_logs; }

dispatch
