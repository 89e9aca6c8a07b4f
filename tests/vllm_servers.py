"""Start and stop two real vLLM OpenAI-compatible servers (base + teacher) for tests.

Standard library only, so it runs from any Python (the test venv, the CI shell);
the servers themselves run from a separate vLLM venv (see .ci/install_vllm.sh).

Shell, from the repository root:

    python tests/vllm_servers.py up      # install vLLM into .venv-vllm if needed, start both servers
                                         # on the shipped toy pair (ports 8000 / 8001), write
                                         # .ci/vllm_servers.env (the tests read it)
    python tests/vllm_servers.py start --base DIR --teacher DIR \\
        --venv .venv-vllm --env-file .ci/vllm_servers.env [--base-port 8100 --teacher-port 8101]
    set -a; source .ci/vllm_servers.env; set +a   # OPTIMAL_SAMPLING_THETA_URL=... etc.
    python tests/vllm_servers.py check --env-file .ci/vllm_servers.env
    python tests/vllm_servers.py stop  --env-file .ci/vllm_servers.env

pytest:

    from tests.vllm_servers import running_servers, servers_from_env
    cfg = servers_from_env()            # None when no servers are configured
    with running_servers(base_dir, teacher_dir, venv=...) as cfg: ...

The env file holds shell-sourceable ``KEY=value`` lines:
OPTIMAL_SAMPLING_THETA_URL / _T_URL (``http://127.0.0.1:PORT``, no ``/v1``),
OPTIMAL_SAMPLING_THETA_MODEL / _T_MODEL (served model names),
OPTIMAL_SAMPLING_THETA_MODEL_DIR / _T_MODEL_DIR, OPTIMAL_SAMPLING_THETA_PID / _T_PID,
OPTIMAL_SAMPLING_THETA_LOG / _T_LOG, OPTIMAL_SAMPLING_MAX_LOGPROBS.

Why each flag is there: tests/VLLM_SERVERS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

ROLES = ("THETA", "T")  # base (policy) and teacher, as in CoordinatorConfig.theta_url / t_url
PREFIX = "OPTIMAL_SAMPLING_"
REPO = Path(__file__).resolve().parent.parent
DEFAULT_ENV_FILE = REPO / ".ci" / "vllm_servers.env"
DEFAULT_VENV = REPO / ".venv-vllm"
TOY_ASSETS = REPO / "optimal_sampling" / "toy" / "assets"

# What a test run without servers says, once (tests/conftest.py).
SKIP_HINT = (
    "no vLLM servers: start two with `python tests/vllm_servers.py up` "
    "(installs vLLM into .venv-vllm the first time; tests/VLLM_SERVERS.md)"
)


def in_ci() -> bool:
    """Under CI the server tests must run: without servers they fail instead of being left out."""
    return os.environ.get("CI", "").lower() not in ("", "0", "false")


# --------------------------------------------------------------------------- HTTP


def http_json(url: str, payload: dict | None = None, timeout: float = 30.0):
    """GET (payload None) or POST JSON; return (status, parsed body or text)."""
    data = None if payload is None else json.dumps(payload).encode()
    req = urllib.request.Request(url, data=data, method="GET" if data is None else "POST")
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            status, body = resp.status, resp.read()
    except urllib.error.HTTPError as e:
        status, body = e.code, e.read()
    try:
        return status, json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return status, body.decode(errors="replace")


def probe_request(url: str, model: str, k: int = 5, prompt=(1, 20, 30, 40)) -> dict:
    """One real 1-token completion with top-k log-probs keyed by token id."""
    status, body = http_json(
        url.rstrip("/") + "/v1/completions",
        {
            "model": model,
            "prompt": list(prompt),
            "max_tokens": 1,
            "temperature": 1.0,
            "logprobs": k,
            "return_tokens_as_token_ids": True,
        },
        timeout=60,
    )
    if status != 200:
        raise RuntimeError(f"{url}: /v1/completions returned HTTP {status}: {body}")
    try:
        top = body["choices"][0]["logprobs"]["top_logprobs"][0]
    except (KeyError, IndexError, TypeError) as e:
        raise RuntimeError(f"{url}: malformed completion response ({e}): {body}") from e
    if not top or not all(key.startswith("token_id:") for key in top):
        raise RuntimeError(f"{url}: top_logprobs not keyed by token id: {top}")
    return body


# --------------------------------------------------------------------------- helpers


def _log_tail(path, n: int = 60) -> str:
    try:
        lines = Path(path).read_text(errors="replace").splitlines()
    except OSError as e:
        return f"<no log: {e}>"
    return "\n".join(lines[-n:])


def _port_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child of ours counts as dead.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def _cpus() -> list[int]:
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return list(range(os.cpu_count() or 1))


def vllm_python(venv: str | None) -> str:
    venv = venv or os.environ.get("VLLM_VENV")
    if not venv:
        raise SystemExit(
            "no vLLM venv: pass --venv DIR or set VLLM_VENV, or run `python tests/vllm_servers.py up`, "
            "which installs one into .venv-vllm"
        )
    py = Path(venv) / "bin" / "python"
    if not py.exists():
        raise SystemExit(
            f"{py} does not exist; run `.ci/install_vllm.sh {venv}` first "
            "(or `python tests/vllm_servers.py up`, which does both)"
        )
    return str(py)


def install_vllm(venv) -> None:
    """Run .ci/install_vllm.sh (it returns at once when vLLM is already importable there)."""
    subprocess.run(["bash", str(REPO / ".ci" / "install_vllm.sh"), str(venv)], check=True)


def server_command(
    python: str,
    model_dir: str,
    name: str,
    port: int,
    *,
    max_logprobs: int = -1,
    max_model_len: int = 512,
    kv_cache: str = "64M",
    host: str = "127.0.0.1",
    block_size: int | None = 32,
    extra_args=(),
) -> list[str]:
    return [
        python,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(model_dir),
        "--served-model-name",
        name,
        "--host",
        host,
        "--port",
        str(port),
        "--dtype",
        "float32",  # "auto" silently casts fp32 weights to bf16
        "--max-model-len",
        str(max_model_len),
        "--max-logprobs",
        str(max_logprobs),  # -1: the whole vocabulary
        "--enforce-eager",
        "--kv-cache-memory-bytes",
        kv_cache,  # required on these machines; "M" = 2^20
        "--generation-config",
        "vllm",  # ignore the model's generation_config.json defaults
        "--seed",
        "0",
        # The CPU default block size is 128, and only whole blocks are cached, so a re-sent prefix
        # shorter than 128 tokens (every coordinator step re-sends one) is prefilled again each
        # time. 32 is the smallest block the CPU attention backend accepts.
        *(["--block-size", str(block_size)] if block_size else []),
        *extra_args,
    ]


def server_env(cpu: str, tmpdir: str) -> dict:
    env = dict(os.environ)
    # The vLLM venv must not see the caller's venv or PYTHONPATH.
    for key in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV"):
        env.pop(key, None)
    env.update(
        VLLM_CPU_OMP_THREADS_BIND=cpu,  # one core per server (default pins both to core 0)
        TORCHDYNAMO_DISABLE="1",  # else the first logprob request compiles ~14 s
        VLLM_HOST_IP="127.0.0.1",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        VLLM_NO_USAGE_STATS="1",
        DO_NOT_TRACK="1",
        TMPDIR=tmpdir,  # each start leaves IPC socket files here
        PYTHONUNBUFFERED="1",
        # /pause, /collective_rpc, /reset_prefix_cache, /resume: how a trainer loads new policy
        # weights into the base server without NCCL (DualVLLMCoordinator.load_base_weights).
        VLLM_SERVER_DEV_MODE="1",
    )
    return env


# --------------------------------------------------------------------------- start / stop


def _wait_ready(url: str, model: str, proc: subprocess.Popen, log: str, deadline: float) -> float:
    """Wait for /health, then one real completion with logprobs. Return seconds waited."""
    t0 = time.monotonic()
    healthy = False
    last_err = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"vLLM server {model} ({url}) exited with code {proc.returncode}.\n"
                f"--- {log} (tail) ---\n{_log_tail(log)}"
            )
        try:
            if not healthy:
                status, _ = http_json(url + "/health", timeout=5)
                healthy = status == 200
            if healthy:
                probe_request(url, model)
                return time.monotonic() - t0
        except (OSError, RuntimeError) as e:  # connection refused, reset, engine warming up
            last_err = e
        time.sleep(0.5)
    raise TimeoutError(
        f"vLLM server {model} ({url}) not ready within the timeout "
        f"(healthy={healthy}, last error: {last_err}).\n"
        f"--- {log} (tail) ---\n{_log_tail(log)}"
    )


def write_env_file(path, cfg: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ["# written by tests/vllm_servers.py; `source` it or pass --env-file"]
    lines += [f"{k}={shlex.quote(str(v))}" for k, v in cfg.items()]
    path.write_text("\n".join(lines) + "\n")


def read_env_file(path) -> dict:
    cfg = {}
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, value = line.split("=", 1)
        parts = shlex.split(value)
        cfg[key.strip()] = parts[0] if parts else ""
    return cfg


def start_servers(
    base_dir,
    teacher_dir,
    *,
    venv=None,
    base_port=8100,
    teacher_port=8101,
    base_name="base",
    teacher_name="teacher",
    env_file=None,
    log_dir=None,
    max_logprobs=-1,
    max_model_len=512,
    kv_cache="64M",
    timeout=300.0,
    cpus=None,
    extra_args=(),
    verbose=True,
    base_extra_args=(),
    teacher_extra_args=(),
    block_size=32,
) -> dict:
    """Start both servers, wait until each answered a real logprob request, return the config.

    `extra_args` go to both servers, `base_extra_args` / `teacher_extra_args` to one. On any
    failure both servers are stopped and the error carries the log tail.
    """
    python = vllm_python(venv)
    # Absolute paths: /v1/models reports the path the server was given as the model's `root`,
    # and clients look for the tokenizer there, from whatever directory they run in.
    base_dir, teacher_dir = (Path(d).resolve() for d in (base_dir, teacher_dir))
    for d in (base_dir, teacher_dir):
        if not (d / "config.json").exists():
            raise SystemExit(f"model dir {d} has no config.json")
    for port in (base_port, teacher_port):
        if not _port_free(port):
            raise SystemExit(f"port {port} is in use (a server left running? try `stop`)")
    if cpus is None:
        avail = _cpus()
        cpus = [str(avail[0]), str(avail[1])] if len(avail) >= 2 else ["auto", "auto"]
    log_dir = Path(log_dir or tempfile.mkdtemp(prefix="vllm-servers-"))
    log_dir.mkdir(parents=True, exist_ok=True)

    specs = [
        ("THETA", base_dir, base_name, base_port, cpus[0], base_extra_args),
        ("T", teacher_dir, teacher_name, teacher_port, cpus[1], teacher_extra_args),
    ]
    procs, cfg = {}, {}
    t_start = time.monotonic()
    try:
        for role, model_dir, name, port, cpu, own_args in specs:
            tmpdir = log_dir / f"tmp-{name}"
            tmpdir.mkdir(exist_ok=True)
            log = log_dir / f"{name}.log"
            cmd = server_command(
                python,
                model_dir,
                name,
                port,
                max_logprobs=max_logprobs,
                max_model_len=max_model_len,
                kv_cache=kv_cache,
                block_size=block_size,
                extra_args=(*extra_args, *own_args),
            )
            with open(log, "w") as logf:
                logf.write("$ " + " ".join(shlex.quote(c) for c in cmd) + "\n")
                logf.flush()
                # Own session: the server and its engine process form a group we can
                # clean up without touching anything else.
                procs[role] = subprocess.Popen(
                    cmd,
                    stdout=logf,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    env=server_env(cpu, str(tmpdir)),
                    start_new_session=True,
                )
            url = f"http://127.0.0.1:{port}"
            cfg.update(
                {
                    f"{PREFIX}{role}_URL": url,
                    f"{PREFIX}{role}_MODEL": name,
                    f"{PREFIX}{role}_MODEL_DIR": str(Path(model_dir).resolve()),
                    f"{PREFIX}{role}_PID": procs[role].pid,
                    f"{PREFIX}{role}_LOG": str(log),
                    f"{PREFIX}{role}_TMPDIR": str(tmpdir),
                }
            )
            if verbose:
                print(
                    f"[vllm_servers] started {name} (pid {procs[role].pid}, cpu {cpu}) on {url}, log {log}", flush=True
                )
        cfg[f"{PREFIX}MAX_LOGPROBS"] = max_logprobs
        cfg[f"{PREFIX}VLLM_VENV"] = os.path.dirname(os.path.dirname(os.path.abspath(python)))  # engine tests run there
        if env_file:
            # Written before waiting, so `stop` finds the PIDs even if the wait is interrupted.
            write_env_file(env_file, cfg)
        deadline = time.monotonic() + timeout
        for role, _, name, _, _, _ in specs:
            _wait_ready(cfg[f"{PREFIX}{role}_URL"], name, procs[role], cfg[f"{PREFIX}{role}_LOG"], deadline)
            if verbose:
                print(f"[vllm_servers] {name} ready after {time.monotonic() - t_start:.1f} s", flush=True)
    except BaseException:
        stop_servers(cfg, verbose=verbose)
        raise
    cfg[f"{PREFIX}STARTUP_SECONDS"] = round(time.monotonic() - t_start, 1)
    if env_file:
        write_env_file(env_file, cfg)
    return cfg


def _is_vllm(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"vllm" in f.read()
    except FileNotFoundError:
        return False
    except OSError:  # no /proc (not Linux): trust the env file
        return True


def _stop_pid(pid: int, grace: float) -> str:
    if not _alive(pid):
        return "not running"
    if not _is_vllm(pid):
        return "skipped: pid now belongs to another program (stale env file)"
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return "not running"
    end = time.monotonic() + grace
    while time.monotonic() < end:
        with contextlib.suppress(ChildProcessError):
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                break
        if not _alive(pid):
            break
        time.sleep(0.1)
    else:
        # Still up: kill the process group this module created for it (pgid == pid).
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
        return "killed (SIGKILL) after SIGTERM timed out"
    # Engine children left behind in the server's own group get SIGTERM too.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGTERM)
    return "stopped (SIGTERM)"


def stop_servers(cfg: dict, grace: float = 20.0, verbose: bool = True) -> None:
    for role in ROLES:
        pid = cfg.get(f"{PREFIX}{role}_PID")
        if not pid:
            continue
        status = _stop_pid(int(pid), grace)
        tmpdir = cfg.get(f"{PREFIX}{role}_TMPDIR")
        if tmpdir and Path(tmpdir).name.startswith("tmp-"):
            shutil.rmtree(tmpdir, ignore_errors=True)  # IPC sockets left by the server
        if verbose:
            print(f"[vllm_servers] {cfg.get(f'{PREFIX}{role}_MODEL', role)} pid {pid}: {status}", flush=True)


# --------------------------------------------------------------------------- pytest helpers


def servers_from_env(env_file=None) -> dict | None:
    """Server config from os.environ (OPTIMAL_SAMPLING_THETA_URL, ...) or from an env file
    (argument, $OPTIMAL_SAMPLING_VLLM_ENV_FILE, or .ci/vllm_servers.env).  None if neither."""
    if os.environ.get(f"{PREFIX}THETA_URL") and os.environ.get(f"{PREFIX}T_URL"):
        return {k: v for k, v in os.environ.items() if k.startswith(PREFIX)}
    path = Path(env_file or os.environ.get(f"{PREFIX}VLLM_ENV_FILE") or DEFAULT_ENV_FILE)
    if path.exists():
        cfg = read_env_file(path)
        if cfg.get(f"{PREFIX}THETA_URL") and cfg.get(f"{PREFIX}T_URL"):
            return cfg
    return None


@contextlib.contextmanager
def running_servers(base_dir, teacher_dir, **kwargs):
    """Context manager for a session fixture: start both servers, yield the config, stop them."""
    cfg = start_servers(base_dir, teacher_dir, **kwargs)
    try:
        yield cfg
    finally:
        stop_servers(cfg)


# --------------------------------------------------------------------------- CLI


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Start/stop two real vLLM servers for tests.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    st = sub.add_parser("start", help="start base + teacher, wait until both answer")
    st.add_argument("--base", required=True, help="base (policy) model dir")
    st.add_argument("--teacher", required=True, help="teacher model dir")
    st.add_argument("--base-port", type=int, default=8100)
    st.add_argument("--teacher-port", type=int, default=8101)
    st.add_argument("--base-name", default="base")
    st.add_argument("--teacher-name", default="teacher")
    st.add_argument("--venv", default=None, help="vLLM venv (default $VLLM_VENV)")
    st.add_argument("--env-file", default=str(DEFAULT_ENV_FILE))
    st.add_argument("--log-dir", default=None, help="logs + per-server TMPDIR (default: a new temp dir)")
    st.add_argument("--max-logprobs", type=int, default=-1, help="-1 = whole vocabulary")
    st.add_argument("--max-model-len", type=int, default=512)
    st.add_argument("--kv-cache", default="64M")
    st.add_argument(
        "--block-size",
        type=int,
        default=32,
        help="KV block size; CPU default 128 never caches a prefix under 128 tokens (0: vLLM's default)",
    )
    st.add_argument("--timeout", type=float, default=300.0)
    st.add_argument("--cpus", default=None, help="two OMP bind specs, e.g. '0,1' (default: first two cores)")
    st.add_argument("extra", nargs="*", help="extra server args after --")
    up = sub.add_parser("up", help="install vLLM if needed, then start base + teacher (default: the toy pair)")
    up.add_argument("--base", default=str(TOY_ASSETS / "base"), help="base (policy) model dir")
    up.add_argument("--teacher", default=str(TOY_ASSETS / "teacher"), help="teacher model dir")
    up.add_argument(
        "--venv", default=os.environ.get("VLLM_VENV") or str(DEFAULT_VENV), help="where vLLM is (or is installed)"
    )
    # VLLM_BASE_PORT / VLLM_TEACHER_PORT: a second set of servers on one machine (e.g. a CI run
    # beside a developer's servers)
    up.add_argument("--base-port", type=int, default=int(os.environ.get("VLLM_BASE_PORT", 8000)))
    up.add_argument("--teacher-port", type=int, default=int(os.environ.get("VLLM_TEACHER_PORT", 8001)))
    up.add_argument("--env-file", default=str(DEFAULT_ENV_FILE))
    up.add_argument("--timeout", type=float, default=300.0)
    sp = sub.add_parser("stop", help="SIGTERM both servers by PID, then delete the env file")
    sp.add_argument("--env-file", default=str(DEFAULT_ENV_FILE))
    ck = sub.add_parser("check", help="send one logprob request to each server")
    ck.add_argument("--env-file", default=str(DEFAULT_ENV_FILE))
    args = ap.parse_args(argv)

    if args.cmd == "up":
        try:
            install_vllm(args.venv)
        except subprocess.CalledProcessError as e:
            print(
                f"[vllm_servers] FAILED: installing vLLM into {args.venv} exited with {e.returncode}", file=sys.stderr
            )
            return 1
        try:
            cfg = start_servers(
                args.base,
                args.teacher,
                venv=args.venv,
                base_port=args.base_port,
                teacher_port=args.teacher_port,
                env_file=args.env_file,
                timeout=args.timeout,
            )
        except (RuntimeError, TimeoutError) as e:
            print(f"[vllm_servers] FAILED: {e}", file=sys.stderr)
            return 1
        stop = "python tests/vllm_servers.py stop" + (
            "" if Path(args.env_file) == DEFAULT_ENV_FILE else f" --env-file {shlex.quote(args.env_file)}"
        )
        print(
            f"[vllm_servers] base {cfg[PREFIX + 'THETA_URL']} and teacher {cfg[PREFIX + 'T_URL']} are up; "
            f"the tests read {args.env_file}; stop them with: {stop}"
        )
        return 0
    if args.cmd == "start":
        cpus = args.cpus.split(",") if args.cpus else None
        try:
            cfg = start_servers(
                args.base,
                args.teacher,
                venv=args.venv,
                base_port=args.base_port,
                teacher_port=args.teacher_port,
                base_name=args.base_name,
                teacher_name=args.teacher_name,
                env_file=args.env_file,
                log_dir=args.log_dir,
                max_logprobs=args.max_logprobs,
                max_model_len=args.max_model_len,
                kv_cache=args.kv_cache,
                timeout=args.timeout,
                cpus=cpus,
                extra_args=args.extra,
                block_size=args.block_size,
            )
        except (RuntimeError, TimeoutError) as e:
            print(f"[vllm_servers] FAILED: {e}", file=sys.stderr)
            return 1
        print(f"[vllm_servers] both ready in {cfg[PREFIX + 'STARTUP_SECONDS']} s; wrote {args.env_file}")
        return 0
    cfg = read_env_file(args.env_file) if Path(args.env_file).exists() else {}
    if not cfg:
        print(f"[vllm_servers] no env file {args.env_file}", file=sys.stderr)
        return 1
    if args.cmd == "stop":
        stop_servers(cfg)
        Path(args.env_file).unlink()  # a stale file would point tests at dead servers
        return 0
    rc = 0
    for role in ROLES:
        url, model = cfg[f"{PREFIX}{role}_URL"], cfg[f"{PREFIX}{role}_MODEL"]
        try:
            body = probe_request(url, model)
            print(f"{model} {url}: ok {json.dumps(body['choices'][0]['logprobs']['top_logprobs'][0])}")
        except (OSError, RuntimeError) as e:
            print(f"{model} {url}: FAILED {e}", file=sys.stderr)
            rc = 1
    return rc


if __name__ == "__main__":
    sys.exit(main())
