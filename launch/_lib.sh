# shellcheck shell=bash
# Helpers shared by launch/tpu_vm.sh, launch/gpu_vm.sh and launch/verifier.sh (sourced, never run on its own).
#
# What lives here: error reporting, option-value checks, shell quoting for printed commands, the dry-run
# switch, secret forwarding (values travel on an ssh session's stdin, never on a command line and never in a
# file), the tarball of the working tree, the remote scripts both VM kinds share (install, launch), and the
# options and subcommand dispatch both VM scripts share. verifier.sh uses only the first few.

PROG=${PROG:-$(basename "$0")}
if ((BASH_VERSINFO[0] < 4 || (BASH_VERSINFO[0] == 4 && BASH_VERSINFO[1] < 4))); then
  printf '%s: error: needs bash >= 4.4, this is %s (on macOS: brew install bash)\n' "$PROG" "$BASH_VERSION" >&2
  exit 2
fi
DRY_RUN=${DRY_RUN:-0}

die() {
  printf '%s: error: %s\n' "$PROG" "$*" >&2
  printf "Run '%s --help' for every option.\n" "$PROG" >&2
  exit 2
}

note() { printf '%s: %s\n' "$PROG" "$*" >&2; }

# need_value OPTION ARGS...: the option must be followed by a non-empty value (not another option).
need_value() {
  [[ $# -ge 2 && -n $2 && $2 != --* ]] || die "option $1 needs a value"
}

# need_raw_value OPTION ARGS...: like need_value, for options whose value may itself start with -- (flags
# passed through to gcloud).
need_raw_value() {
  [[ $# -ge 2 && -n $2 ]] || die "option $1 needs a value"
}

check_int() {  # check_int OPTION VALUE
  [[ $2 =~ ^[0-9]+$ ]] || die "option $1 must be a non-negative integer, got '$2'"
}

check_env_name() {  # check_env_name OPTION NAME
  [[ $2 =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]] || die "option $1: '$2' is not a valid environment variable name"
}

# q ARG: ARG as one shell word; plain words stay as they are, anything else is single-quoted.
q() {
  if [[ $1 =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

# qall ARGS...: the arguments as one shell command line.
qall() {
  local out="" arg
  for arg in "$@"; do out+="$(q "$arg") "; done
  printf '%s' "${out% }"
}

# run CMD...: run the command, or print it under --dry-run.
run() {
  if [[ $DRY_RUN == 1 ]]; then
    printf '+ %s\n' "$(qall "$@")"
  else
    "$@"
  fi
}

# run_stdin SCRIPT SHOWN CMD...: run CMD with SCRIPT on its stdin (through a pipe: a builtin printf, so the
# text is in no argv and no temporary file). Under --dry-run print CMD and SHOWN (the script with secrets
# masked) instead.
run_stdin() {
  local script=$1 shown=$2
  shift 2
  if [[ $DRY_RUN == 1 ]]; then
    printf '+ %s <<SCRIPT\n%s\nSCRIPT\n' "$(qall "$@")" "$shown"
  else
    printf '%s\n' "$script" | "$@"
  fi
}

require_gcloud() {
  [[ $DRY_RUN == 1 ]] && return 0
  command -v gcloud >/dev/null 2>&1 ||
    die "gcloud not found on PATH: install the Google Cloud CLI (https://cloud.google.com/sdk) or use --dry-run"
}

# ---- environment forwarded to the trainer ----

# Secrets: forwarded by name, when set in the local environment. The defaults cover the verifier key and a
# Hugging Face token; --secret-env adds more.
SECRET_NAMES=(VERIFIER_API_KEY OPENAI_API_KEY HF_TOKEN)
PLAIN_ENV=()  # KEY=VALUE pairs from --env (not secret: printed as they are)

add_secret_name() {  # add_secret_name OPTION NAME
  check_env_name "$1" "$2"
  local n
  for n in "${SECRET_NAMES[@]}"; do [[ $n == "$2" ]] && return 0; done
  SECRET_NAMES+=("$2")
}

add_plain_env() {  # add_plain_env OPTION KEY=VALUE
  [[ $2 == *=* ]] || die "option $1 takes KEY=VALUE, got '$2'"
  check_env_name "$1" "${2%%=*}"
  PLAIN_ENV+=("$2")
}

# env_exports MODE: export lines for the remote script. MODE=real puts the secret values in (for stdin only),
# MODE=shown masks them. Secrets unset locally are skipped, with a note on stderr in the shown form.
env_exports() {
  local mode=$1 name value pair
  for name in "${SECRET_NAMES[@]}"; do
    value=${!name-}
    if [[ -z $value ]]; then
      [[ $mode == shown ]] && note "secret $name is not set locally; not forwarded"
      continue
    fi
    if [[ $mode == real ]]; then
      printf 'export %s=%q\n' "$name" "$value"
    else
      printf 'export %s=%s\n' "$name" "'****'"
    fi
  done
  for pair in "${PLAIN_ENV[@]}"; do
    printf 'export %s=%s\n' "${pair%%=*}" "$(q "${pair#*=}")"
  done
}

# ---- the project on the remote machine ----

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TARBALL_NAME=speciarl_jax_src.tar.gz

# make_tarball PATH: the working tree as git sees it (tracked files as they are on disk, plus untracked files
# that .gitignore does not exclude), so uncommitted edits travel and .venv/, runs/ and caches do not.
make_tarball() {
  local out=$1
  if [[ $DRY_RUN == 1 ]]; then
    printf '+ %s\n' "git -C $(q "$REPO_ROOT") ls-files -z --cached --others --exclude-standard | tar -czf $(q "$out") --null -T -"
    return 0
  fi
  git -C "$REPO_ROOT" rev-parse --is-inside-work-tree >/dev/null 2>&1 ||
    die "$REPO_ROOT is not a git working tree: use --source git --repo URL instead of --source local"
  local file
  (
    cd "$REPO_ROOT" || exit 1
    git ls-files -z --cached --others --exclude-standard | while IFS= read -r -d '' file; do
      [[ -e $file ]] && printf '%s\0' "$file"  # a tracked file deleted on disk is left out
    done | tar -czf "$out" --null -T -
  )
  note "packed the working tree of $REPO_ROOT ($(du -h "$out" | cut -f1))"
}

# remote_unpack_script DIR: unpack the tarball (copied to the remote home) into DIR.
remote_unpack_script() {
  local dir=$1
  # shellcheck disable=SC2016  # $(...) is for the remote shell
  printf 'set -euo pipefail; mkdir -p %s && tar -xzf %s -C %s && rm -f %s && echo "$(hostname): project unpacked in %s"' \
    "$(q "$dir")" "$TARBALL_NAME" "$(q "$dir")" "$TARBALL_NAME" "$(q "$dir")"
}

# remote_clone_script DIR URL REF: clone (or update) a git checkout of URL at REF in DIR.
remote_clone_script() {
  local dir=$1 url=$2 ref=$3
  # shellcheck disable=SC2016  # $(...) is for the remote shell
  printf 'set -euo pipefail; if [ ! -d %s/.git ]; then git clone --quiet %s %s; fi; git -C %s fetch --quiet origin %s && git -C %s checkout --quiet --force FETCH_HEAD && echo "$(hostname): %s at $(git -C %s rev-parse --short HEAD)"' \
    "$(q "$dir")" "$(q "$url")" "$(q "$dir")" "$(q "$dir")" "$(q "$ref")" "$(q "$dir")" "$(q "$dir")" "$(q "$dir")"
}

# remote_setup_script DIR EXTRA PYTHON_VERSION [PRELUDE]: a virtual environment in DIR/.venv with the project
# installed as `pip install -e ".[EXTRA]"`. The Cloud TPU and Deep Learning VM images ship Python 3.10 while
# the project needs >= 3.11, so uv provides the interpreter (installed for the user if missing).
remote_setup_script() {
  local dir=$1 extra=$2 pyver=$3 prelude=${4:-}
  cat <<EOF
set -euo pipefail
${prelude}
cd $(q "$dir")
export PATH="\$HOME/.local/bin:\$PATH"
if ! command -v uv >/dev/null 2>&1; then
  python3 -m pip install --user --quiet uv || curl -LsSf https://astral.sh/uv/install.sh | sh
fi
if [ ! -x .venv/bin/python ]; then uv venv --seed --python $(q "$pyver") .venv; fi
.venv/bin/pip install --quiet --upgrade pip
.venv/bin/pip install --quiet -e $(q ".[$extra]")
.venv/bin/python -c "import jax, speciarl_jax; print('\$(hostname): jax', jax.__version__, 'installed')"
EOF
}

# remote_launch_script DIR LOG PIDFILE WAIT_CMD TRAIN_CMD EXPORTS: start the trainer in the background,
# detached from the ssh session (setsid + nohup, stdin from /dev/null), and return at once.
remote_launch_script() {
  local dir=$1 log=$2 pidfile=$3 wait_cmd=$4 train_cmd=$5 exports=$6 inner
  if [[ -n $wait_cmd ]]; then
    inner="$wait_cmd && exec $train_cmd"
  else
    inner="exec $train_cmd"
  fi
  cat <<EOF
set -euo pipefail
cd $(q "$dir")
mkdir -p launch_logs
pidfile=$pidfile
if [ -f "\$pidfile" ] && kill -0 "\$(cat "\$pidfile")" 2>/dev/null; then
  echo "\$(hostname): a trainer is already running (pid \$(cat "\$pidfile")); run the 'stop' subcommand first" >&2
  exit 1
fi
${exports}
export PYTHONUNBUFFERED=1
setsid nohup bash -c $(q "$inner") > $(q "$log") 2>&1 < /dev/null &
echo \$! > "\$pidfile"
echo "\$(hostname): trainer started (pid \$!), log $(q "$dir")/$log"
EOF
}

# remote_stop_script DIR PIDFILE WHAT: SIGTERM to the background process. The trainer finishes the current
# step, saves a checkpoint and exits; on several workers all of them do so at the same step, whichever
# received the signal (speciarl_jax/stopping.py); vLLM shuts down.
remote_stop_script() {
  local dir=$1 pidfile=$2 what=$3
  # shellcheck disable=SC2016  # $pidfile and $(...) are for the remote shell
  printf 'cd %s && pidfile=%s && if [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then kill -TERM "$(cat "$pidfile")" && echo "$(hostname): sent SIGTERM to the %s (pid $(cat "$pidfile"))"; else echo "$(hostname): no %s running"; fi' \
    "$(q "$dir")" "$pidfile" "$what" "$what"
}

# verifier_wait_cmd URL TIMEOUT KEY_ENV [MODEL]: the health check the trainer waits on before it starts.
verifier_wait_cmd() {
  local url=$1 timeout=$2 key_env=$3 model=${4:-}
  local cmd
  cmd="bash launch/verifier.sh wait --url $(q "$url") --timeout $(q "$timeout")"
  [[ -n $key_env ]] && cmd+=" --api-key-env $(q "$key_env")"
  [[ -n $model ]] && cmd+=" --served-model-name $(q "$model")"
  printf '%s' "$cmd"
}

# train_cmd CONFIG OVERRIDES...: the trainer's command line, run from the project folder.
train_cmd() {
  local config=$1
  shift
  local cmd
  cmd=".venv/bin/python -m speciarl_jax.train --config=$(q "$config")"
  local arg
  for arg in "$@"; do cmd+=" $(q "$arg")"; done
  printf '%s' "$cmd"
}

check_overrides() {  # the arguments after `--` of a train command must be trainer flags
  local arg
  for arg in "$@"; do
    [[ $arg == --* ]] || die "'$arg' after -- is not a trainer flag: pass overrides as --config.KEY=VALUE"
  done
}

# ---- the command line of tpu_vm.sh and gpu_vm.sh ----
#
# The options both VM scripts take are parsed here, so that each one is written once and means the same in
# both. A script sets SUBCOMMANDS (" create copy ... "), VM_NOUN and ZONE_EXAMPLE (for error messages) and its
# own defaults, defines
#   usage               its --help text
#   parse_own_option    its own options: sets OPT_WORDS to the number of words taken, leaves it 0 if unknown
#   check_own_options   its own checks, run after the shared ones
#   follow_train_log    the last step of `all` and of `train --follow`
#   do_SUBCOMMAND       one function per subcommand
# and then calls parse_vm_options "$@" and dispatch.

# parse_vm_options ARGS...: the subcommand, then the options, into the globals below; checks them and sets LOC.
# shellcheck disable=SC2034,SC2153  # the scripts that call this set SUBCOMMANDS and read the globals
parse_vm_options() {
  SUBCOMMAND=""
  NAME="" ZONE="" PROJECT=""
  SPOT=0 CREATE_FLAGS=()
  SOURCE=local REPO="" REF=HEAD REMOTE_DIR=speciarl_jax PYVER=3.12
  CONFIG=configs/cub_grpo.py
  WAIT_VERIFIER="" VERIFIER_KEY_ENV="" VERIFIER_MODEL="" VERIFIER_TIMEOUT=1800 FOLLOW=0
  EXTRA=()

  if [[ $# -eq 0 ]]; then usage; exit 2; fi
  case $1 in
    -h | --help) usage; exit 0 ;;
    -*) die "the first argument must be a subcommand (${SUBCOMMANDS# }), got '$1'" ;;
    *) [[ $SUBCOMMANDS == *" $1 "* ]] || die "unknown subcommand '$1' (one of:${SUBCOMMANDS% })"
       SUBCOMMAND=$1; shift ;;
  esac

  while [[ $# -gt 0 ]]; do
    if [[ $1 == --*=* ]]; then set -- "${1%%=*}" "${1#*=}" "${@:2}"; fi
    case $1 in
      --name) need_value "$@"; NAME=$2; shift 2 ;;
      --zone) need_value "$@"; ZONE=$2; shift 2 ;;
      --project) need_value "$@"; PROJECT=$2; shift 2 ;;
      --spot) SPOT=1; shift ;;
      --create-flag) need_raw_value "$@"; CREATE_FLAGS+=("$2"); shift 2 ;;
      --source) need_value "$@"; SOURCE=$2; shift 2 ;;
      --repo) need_value "$@"; REPO=$2; shift 2 ;;
      --ref) need_value "$@"; REF=$2; shift 2 ;;
      --remote-dir) need_value "$@"; REMOTE_DIR=$2; shift 2 ;;
      --python-version) need_value "$@"; PYVER=$2; shift 2 ;;
      --config) need_value "$@"; CONFIG=$2; shift 2 ;;
      --secret-env) need_value "$@"; add_secret_name "$1" "$2"; shift 2 ;;
      --env) need_value "$@"; add_plain_env "$1" "$2"; shift 2 ;;
      --wait-verifier) need_value "$@"; WAIT_VERIFIER=$2; shift 2 ;;
      --verifier-key-env) need_value "$@"; add_secret_name "$1" "$2"; VERIFIER_KEY_ENV=$2; shift 2 ;;
      --verifier-timeout) need_value "$@"; check_int "$1" "$2"; VERIFIER_TIMEOUT=$2; shift 2 ;;
      --verifier-model) need_value "$@"; VERIFIER_MODEL=$2; shift 2 ;;
      --follow) FOLLOW=1; shift ;;
      --dry-run) DRY_RUN=1; shift ;;
      -h | --help) usage; exit 0 ;;
      --) shift; EXTRA=("$@"); break ;;
      *)
        OPT_WORDS=0
        parse_own_option "$@"
        ((OPT_WORDS > 0)) || die "unknown option '$1'"
        shift "$OPT_WORDS" ;;
    esac
  done

  [[ -n $NAME ]] || die "missing --name (the $VM_NOUN name)"
  [[ -n $ZONE ]] || die "missing --zone (e.g. --zone $ZONE_EXAMPLE)"
  [[ -n $PROJECT ]] || die "missing --project (the Google Cloud project id)"
  [[ $NAME =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] ||
    die "--name '$NAME' is not a valid $VM_NOUN name (lower-case letters, digits and dashes, starting with a letter)"
  [[ $SOURCE == local || $SOURCE == git ]] || die "--source must be 'local' or 'git', got '$SOURCE'"
  [[ $SOURCE == local || -n $REPO ]] || die "--source git needs --repo URL"
  check_own_options
  case $SUBCOMMAND in
    train | all) check_overrides "${EXTRA[@]}" ;;
    verifier) ;;  # gpu_vm.sh only: the arguments go to verifier.sh serve
    exec) [[ ${#EXTRA[@]} -gt 0 ]] || die "exec needs a command after --, e.g. exec ... -- nvidia-smi" ;;
    *) [[ ${#EXTRA[@]} -eq 0 ]] || die "subcommand '$SUBCOMMAND' takes no arguments after --" ;;
  esac
  require_gcloud
  LOC=(--zone="$ZONE" --project="$PROJECT")
}

# dispatch: run the subcommand; `all` chains the steps of a run.
dispatch() {
  case $SUBCOMMAND in
    train) do_train; if [[ $FOLLOW == 1 ]]; then follow_train_log; fi ;;
    all) do_create; do_copy; do_setup; do_train; follow_train_log ;;
    *) "do_$SUBCOMMAND" ;;  # SUBCOMMAND is one of SUBCOMMANDS
  esac
}
