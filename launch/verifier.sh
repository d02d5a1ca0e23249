#!/usr/bin/env bash
# The verifier LLM behind vLLM's OpenAI-compatible server, with the output constraint the trainer's verifier
# client asks for (speciarl_jax/verifier: `verifier.guided`), plus the health check the trainer waits on.
#
#   launch/verifier.sh serve [options] [-- EXTRA_VLLM_ARGS...]   run `vllm serve` in the foreground
#   launch/verifier.sh wait  [options]                           poll GET /v1/models until the model is listed
#   launch/verifier.sh check [options]                           one guided request: prints the label it got
set -euo pipefail
PROG=verifier.sh
# die, note, need_value, check_int, q and qall (and the bash version check) come from here.
# shellcheck source-path=SCRIPTDIR
# shellcheck source=_lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/_lib.sh"

usage() {
  cat <<'EOF'
Usage: launch/verifier.sh serve|wait|check [options] [-- EXTRA_VLLM_ARGS...]

Subcommands:
  serve     exec `vllm serve MODEL` (foreground; run it under nohup/tmux, or use
            `launch/gpu_vm.sh verifier` to start it on a GPU VM)
  wait      poll GET URL/v1/models until it answers (and lists the model, when --served-model-name or
            --model is given); exit 1 after --timeout seconds
  check     send one chat completion constrained like the trainer's client, print the label, exit 1 unless
            it is one of the six categories

Server (serve):
  --model MODEL                 Hugging Face id or local folder (default Qwen/Qwen3-30B-A3B-Instruct-2507,
                                a non-thinking instruct model)
  --served-model-name NAME      name clients send; must equal the trainer's --config.verifier.model
                                (default: --model)
  --host HOST                   bind address (default 0.0.0.0: the trainer connects from another VM)
  --port PORT                   default 8000
  --tensor-parallel-size N      GPUs the model is split over (default 2, as in the paper)
  --max-model-len N             context length (default 4096: the verifier prompt is short and the reply
                                is one label)
  --gpu-memory-utilization F    share of each GPU vLLM may take (default 0.90)
  --guided MODE                 the trainer's --config.verifier.guided: structured_choice (default; vLLM >=
                                0.10.2), guided_choice (vLLM < 0.12), json_schema or none. serve checks the
                                installed vLLM against it and picks the server flag that names the backend
  --guided-backend NAME         constrained-decoding backend (default xgrammar; auto: leave it to vLLM)
  --vllm-version VER            the vLLM version to assume instead of asking `vllm --version` (dry runs)
  --vllm BIN                    the vllm executable (default vllm)

Client side (wait, check; --api-key-env also for serve):
  --url URL                     server base URL, with or without /v1 (default http://127.0.0.1:PORT)
  --api-key-env NAME            environment variable holding the API key. serve hands it to vLLM as
                                VLLM_API_KEY (not on the command line); wait and check send it in the
                                Authorization header through curl's stdin. Empty: no key
  --timeout SEC                 wait: give up after this long (default 1800)
  --interval SEC                wait: seconds between polls (default 5)

Other:
  --dry-run                     print the command instead of running it (secrets masked)
  -h, --help                    this text

Trainer flags that match the defaults:
  --config.verifier.base_url=http://VERIFIER_IP:8000/v1
  --config.verifier.model=Qwen/Qwen3-30B-A3B-Instruct-2507
  --config.verifier.guided=structured_choice --config.verifier.api_key_env=VERIFIER_API_KEY
EOF
}

SUBCOMMAND=""
MODEL=Qwen/Qwen3-30B-A3B-Instruct-2507 SERVED_NAME="" HOST=0.0.0.0 PORT=8000 TP=2 MAX_LEN=4096 GPU_UTIL=0.90
GUIDED=structured_choice BACKEND=xgrammar VLLM_VERSION="" VLLM=vllm
URL="" KEY_ENV="" TIMEOUT=1800 INTERVAL=5 DRY_RUN=0 NAME_GIVEN=0
EXTRA=()

if [[ $# -eq 0 ]]; then usage; exit 2; fi
case $1 in
  -h | --help) usage; exit 0 ;;
  serve | wait | check) SUBCOMMAND=$1; shift ;;
  *) die "the first argument must be serve, wait or check, got '$1'" ;;
esac
while [[ $# -gt 0 ]]; do
  if [[ $1 == --*=* ]]; then set -- "${1%%=*}" "${1#*=}" "${@:2}"; fi
  case $1 in
    --model) need_value "$@"; MODEL=$2; NAME_GIVEN=1; shift 2 ;;
    --served-model-name) need_value "$@"; SERVED_NAME=$2; NAME_GIVEN=1; shift 2 ;;
    --host) need_value "$@"; HOST=$2; shift 2 ;;
    --port) need_value "$@"; check_int "$1" "$2"; PORT=$2; shift 2 ;;
    --tensor-parallel-size) need_value "$@"; check_int "$1" "$2"; TP=$2; shift 2 ;;
    --max-model-len) need_value "$@"; check_int "$1" "$2"; MAX_LEN=$2; shift 2 ;;
    --gpu-memory-utilization) need_value "$@"; GPU_UTIL=$2; shift 2 ;;
    --guided) need_value "$@"; GUIDED=$2; shift 2 ;;
    --guided-backend) need_value "$@"; BACKEND=$2; shift 2 ;;
    --vllm-version) need_value "$@"; VLLM_VERSION=$2; shift 2 ;;
    --vllm) need_value "$@"; VLLM=$2; shift 2 ;;
    --url) need_value "$@"; URL=$2; shift 2 ;;
    --api-key-env) need_value "$@"; KEY_ENV=$2; shift 2 ;;
    --timeout) need_value "$@"; check_int "$1" "$2"; TIMEOUT=$2; shift 2 ;;
    --interval) need_value "$@"; check_int "$1" "$2"; INTERVAL=$2; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h | --help) usage; exit 0 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) die "unknown option '$1'" ;;
  esac
done

case $GUIDED in
  structured_choice | guided_choice | json_schema | none) ;;
  *) die "--guided must be structured_choice, guided_choice, json_schema or none (the trainer's verifier.guided), got '$GUIDED'" ;;
esac
[[ $GPU_UTIL =~ ^(0?\.[0-9]+|1(\.0*)?)$ ]] || die "--gpu-memory-utilization must be a fraction in (0, 1], got '$GPU_UTIL'"
[[ $INTERVAL -ge 1 ]] || die "--interval must be at least 1 second"
[[ $SUBCOMMAND == serve || ${#EXTRA[@]} -eq 0 ]] || die "arguments after -- are only for serve (extra vllm flags)"
if [[ -n $KEY_ENV ]]; then
  [[ $KEY_ENV =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]] || die "--api-key-env '$KEY_ENV' is not an environment variable name"
  if [[ $DRY_RUN == 0 && -z ${!KEY_ENV-} ]]; then
    die "--api-key-env names $KEY_ENV, which is unset or empty (export it, or drop --api-key-env for no key)"
  fi
fi
SERVED_NAME=${SERVED_NAME:-$MODEL}
URL=${URL:-http://127.0.0.1:$PORT}
BASE=${URL%/}
BASE=${BASE%/v1}

# version_ge A B: true when version A >= B (numeric dotted prefixes; a suffix such as .post1 or rc1 is ignored).
version_ge() {
  local a b i
  IFS=. read -r -a a <<<"${1%%[!0-9.]*}"
  IFS=. read -r -a b <<<"${2%%[!0-9.]*}"
  for i in 0 1 2; do
    if ((${a[i]:-0} != ${b[i]:-0})); then ((${a[i]:-0} > ${b[i]:-0})); return; fi
  done
  return 0
}

# ---- serve ----

do_serve() {
  local version=$VLLM_VERSION
  if [[ -z $version ]]; then
    if [[ $DRY_RUN == 1 ]]; then
      version=0.12.0
      note "dry run: assuming vLLM $version (pass --vllm-version to show another)"
    else
      command -v "$VLLM" >/dev/null 2>&1 || die "'$VLLM' not found: pip install vllm, or pass --vllm /path/to/vllm"
      version=$("$VLLM" --version 2>/dev/null | grep -Eo '[0-9]+\.[0-9]+(\.[0-9]+)?' | head -n1 || true)
      [[ -n $version ]] || die "could not read the vLLM version from '$VLLM --version': pass --vllm-version"
    fi
  fi
  # The client's request field and the server flag both changed names across vLLM releases.
  local new_cli=0
  version_ge "$version" 0.10.2 && new_cli=1
  if [[ $GUIDED == structured_choice && $new_cli == 0 ]]; then
    die "vLLM $version predates structured_outputs (needs >= 0.10.2): upgrade vLLM, or serve with --guided guided_choice and train with --config.verifier.guided=guided_choice"
  fi
  if [[ $GUIDED == guided_choice ]] && version_ge "$version" 0.12; then
    die "vLLM $version no longer accepts guided_choice: serve and train with guided=structured_choice"
  fi
  local guided_flags=()
  if [[ $GUIDED != none && $BACKEND != auto ]]; then
    if [[ $new_cli == 1 ]]; then
      guided_flags=("--structured-outputs-config.backend=$BACKEND")
    else
      guided_flags=("--guided-decoding-backend=$BACKEND")
    fi
  fi
  local cmd=("$VLLM" serve "$MODEL" --served-model-name "$SERVED_NAME" --host "$HOST" --port "$PORT"
    --tensor-parallel-size "$TP" --max-model-len "$MAX_LEN" --gpu-memory-utilization "$GPU_UTIL"
    "${guided_flags[@]}" "${EXTRA[@]}")
  if [[ $DRY_RUN == 1 ]]; then
    local prefix=""
    [[ -n $KEY_ENV ]] && prefix="VLLM_API_KEY='****' "  # the value of $KEY_ENV, never shown
    printf '+ %s%s\n' "$prefix" "$(qall "${cmd[@]}")"
    return 0
  fi
  note "vLLM $version: serving $MODEL as '$SERVED_NAME' on $HOST:$PORT, guided=$GUIDED"
  if [[ -n $KEY_ENV ]]; then
    # vLLM reads its key from VLLM_API_KEY; an assignment before exec stays out of every argv.
    VLLM_API_KEY=${!KEY_ENV} exec "${cmd[@]}"
  fi
  exec "${cmd[@]}"
}

# ---- client side ----

# http METHOD URL [BODY]: prints the body, then a last line with the HTTP status (000: no connection).
# The Authorization header reaches curl on its stdin (-H @-), so the key is in no argv.
http() {
  local method=$1 url=$2 body=${3:-}
  local args=(curl -sS --max-time 30 -X "$method" -w '\n%{http_code}' "$url")
  [[ -n $body ]] && args+=(-H 'Content-Type: application/json' --data-binary "$body")
  if [[ -n $KEY_ENV ]]; then
    printf 'Authorization: Bearer %s\n' "${!KEY_ENV}" | "${args[@]}" -H @- 2>/dev/null || true
  else
    "${args[@]}" 2>/dev/null || true
  fi
}

show_http() {  # the request as it would be sent, with the header masked
  local header="(no Authorization header)"
  [[ -n $KEY_ENV ]] && header="Authorization: Bearer **** (from \$$KEY_ENV, on curl's stdin)"
  local stdin=()
  [[ -n $KEY_ENV ]] && stdin=(-H @-)
  printf '+ %s   # %s\n' "$(qall curl -sS --max-time 30 -X "$1" "$2" "${stdin[@]}")" "$header"
}

do_wait() {
  local url="$BASE/v1/models"
  if [[ $DRY_RUN == 1 ]]; then
    show_http GET "$url"
    if [[ $NAME_GIVEN == 1 ]]; then
      printf '# repeated every %ss until the list holds "%s", at most %ss\n' "$INTERVAL" "$SERVED_NAME" "$TIMEOUT"
    else
      printf '# repeated every %ss until it answers 200, at most %ss\n' "$INTERVAL" "$TIMEOUT"
    fi
    return 0
  fi
  command -v curl >/dev/null 2>&1 || die "curl not found: install curl"
  local start=$SECONDS last="" out code body next_note=0
  local want="answer"
  [[ $NAME_GIVEN == 1 ]] && want="list '$SERVED_NAME'"
  note "waiting for $url to $want (at most ${TIMEOUT}s)"
  while true; do
    out=$(http GET "$url")
    code=${out##*$'\n'}
    body=${out%$'\n'*}
    case $code in
      200)
        if [[ $NAME_GIVEN == 0 || $body == *"\"$SERVED_NAME\""* ]]; then
          note "verifier ready after $((SECONDS - start))s: $url answers" \
            "$([[ $NAME_GIVEN == 1 ]] && printf 'and lists %s' "$SERVED_NAME")"
          return 0
        fi
        last="the server answers but does not list '$SERVED_NAME' (check --served-model-name / verifier.model): ${body:0:200}" ;;
      401 | 403)
        printf '%s: error: %s answered HTTP %s: the API key is missing or wrong (--api-key-env%s)\n' \
          "$PROG" "$url" "$code" "${KEY_ENV:+ $KEY_ENV}" >&2
        exit 1 ;;
      000) last="no connection" ;;
      *) last="HTTP $code: ${body:0:200}" ;;
    esac
    if ((SECONDS - start >= TIMEOUT)); then
      printf '%s: error: the verifier at %s was not ready after %ss; last: %s\n' "$PROG" "$url" "$TIMEOUT" "$last" >&2
      printf 'Check that vLLM runs (its log), that the port is open between the VMs, and the URL.\n' >&2
      exit 1
    fi
    if ((SECONDS >= next_note)); then
      note "not ready yet ($last)"
      next_note=$((SECONDS + 60))
    fi
    sleep "$INTERVAL"
  done
}

LABELS='["specific", "more specific", "less specific", "generic", "wrong", "abstain"]'

check_body() {
  local constraint=""
  case $GUIDED in
    structured_choice) constraint=", \"structured_outputs\": {\"choice\": $LABELS}" ;;
    guided_choice) constraint=", \"guided_choice\": $LABELS" ;;
    json_schema) constraint=", \"response_format\": {\"type\": \"json_schema\", \"json_schema\": {\"name\": \"verdict\", \"strict\": true, \"schema\": {\"type\": \"object\", \"properties\": {\"category\": {\"type\": \"string\", \"enum\": $LABELS}}, \"required\": [\"category\"], \"additionalProperties\": false}}}" ;;
  esac
  local name=${SERVED_NAME//\\/\\\\}
  name=${name//\"/\\\"}
  printf '{"model": "%s", "temperature": 0, "max_tokens": 16, "chat_template_kwargs": {"enable_thinking": false}, "messages": [{"role": "system", "content": "Compare a predicted label with the true label and reply with one category: specific (same concept or a synonym), more specific, less specific, generic, wrong, or abstain."}, {"role": "user", "content": "Grade this pair.\\n<pair>\\n{\\"ground_truth\\": \\"lion\\", \\"prediction\\": \\"panthera leo\\"}\\n</pair>"}]%s}' \
    "$name" "$constraint"
}

do_check() {
  local url="$BASE/v1/chat/completions" body
  body=$(check_body)
  if [[ $DRY_RUN == 1 ]]; then
    show_http POST "$url"
    printf '# body: %s\n' "$body"
    return 0
  fi
  command -v curl >/dev/null 2>&1 || die "curl not found: install curl"
  local out code reply content
  out=$(http POST "$url" "$body")
  code=${out##*$'\n'}
  reply=${out%$'\n'*}
  if [[ $code != 200 ]]; then
    printf '%s: error: %s answered HTTP %s: %s\n' "$PROG" "$url" "$code" "${reply:0:400}" >&2
    exit 1
  fi
  content=$(printf '%s' "$reply" | python3 -c 'import json, sys; print(json.load(sys.stdin)["choices"][0]["message"]["content"])' 2>/dev/null) ||
    { printf '%s: error: unexpected reply: %s\n' "$PROG" "${reply:0:400}" >&2; exit 1; }
  printf '%s\n' "$content"
  case ${content//\"/} in
    *specific* | *generic* | *wrong* | *abstain*) note "the verifier answered with a category (guided=$GUIDED)" ;;
    *) note "the reply is not one of the six categories: is guided decoding on?"; exit 1 ;;
  esac
}

case $SUBCOMMAND in
  serve) do_serve ;;
  wait) do_wait ;;
  check) do_check ;;
esac
