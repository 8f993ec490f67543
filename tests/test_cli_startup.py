"""`popserve serve` fails fast and cleanly: configuration it cannot serve is refused before Ray starts
with one `popserve: error: ...` line and exit status 2, and Ctrl-C while starting aborts the start
and leaves no Ray process behind. Each test runs the real CLI in a subprocess; only the Ctrl-C
test starts Ray."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

POPSERVE = Path(sys.executable).with_name("popserve")
PORTS = range(8150, 8200)


def popserve_cmd() -> list[str]:
    return [str(POPSERVE)] if POPSERVE.exists() else [sys.executable, "-m", "popserve.service.cli"]


@pytest.fixture(autouse=True)
def own_ray_tmpdir(monkeypatch):
    """A Ray temp dir of each test's own: any Ray process the CLI starts names it (Ray's processes
    carry their session dir), and the CLI cannot join a cluster another test or `ray start` runs
    (no RAY_ADDRESS, no ray_current_cluster). Short: Ray's socket paths must fit in 107 bytes."""
    path = tempfile.mkdtemp(prefix="pst-", dir="/tmp")
    monkeypatch.setenv("RAY_TMPDIR", path)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def cli_env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def run_serve(*args: str, timeout: float = 90, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*popserve_cmd(), "serve", *args], capture_output=True, text=True,
                          timeout=timeout, env=env or cli_env())


def assert_clean_error(proc: subprocess.CompletedProcess, *fragments: str) -> str:
    """Exit status 2, one `popserve: error:` line naming the fragments, no traceback, no Ray."""
    err = proc.stderr
    assert proc.returncode == 2, (proc.returncode, proc.stdout, err)
    assert "Traceback" not in err and "Traceback" not in proc.stdout, err
    errors = [line for line in err.splitlines() if line.startswith("popserve: error: ")]
    assert len(errors) == 1, err
    for fragment in fragments:
        assert fragment in errors[0], (fragment, errors[0])
    assert "popserve: starting" not in proc.stdout  # refused before Ray was started
    return errors[0]


def listening_socket() -> socket.socket:
    """A real server socket on a free port in this project's test range (8150-8199)."""
    for port in PORTS:
        sock = socket.socket()
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            sock.close()
            continue
        sock.listen()
        return sock
    pytest.skip("no free port in 8150-8199")


# ---- refused before Ray starts ----------------------------------------------------------------
def test_port_in_use_is_refused_at_once():
    with listening_socket() as sock:
        port = sock.getsockname()[1]
        t0 = time.monotonic()
        proc = run_serve("--port", str(port))
        elapsed = time.monotonic() - t0
    assert_clean_error(proc, f"127.0.0.1:{port}", "already in use")
    assert elapsed < 30, elapsed  # the old code found out from Serve's proxy, after starting Ray


def test_malformed_yaml_config(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("engine: [1,2\n")
    assert_clean_error(run_serve("--config", str(bad)), str(bad), "not valid YAML")


def test_config_that_is_a_directory(tmp_path):
    assert_clean_error(run_serve("--config", str(tmp_path)), str(tmp_path), "is a directory")


def _layers(model_dir: Path) -> tuple[int, int]:
    """(decoder layers, layers POP must keep for Qwen3-VL's deepstack) straight from config.json."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    deepstack = len(config.get("vision_config", {}).get("deepstack_visual_indexes", []))
    return config["text_config"]["num_hidden_layers"], deepstack


@pytest.mark.parametrize("family", ["qwen3-vl", "gemma3"])
def test_pop_ratio_too_large_for_the_model(family, tiny_dirs):
    from popserve.models.pop import PopConfigError, skipped_layer_count

    model = tiny_dirs[family]
    num_layers, deepstack = _layers(model)
    k_max = num_layers - max(deepstack, 1)
    ratio = (k_max + 1) / num_layers - 0.01  # rounds to one layer more than allowed
    assert ratio < 1 and round(num_layers * ratio) == k_max + 1
    largest = f"{k_max / num_layers:.3f}"

    t0 = time.monotonic()
    proc = run_serve("--model", str(model), "--pop-ratio", str(ratio), "--port", str(free_test_port()))
    elapsed = time.monotonic() - t0
    line = assert_clean_error(proc, f"pop_ratio {ratio}", "largest pop_ratio", f" is {largest} ",
                              f"{k_max} of its {num_layers} decoder layers")
    assert elapsed < 60, (elapsed, line)  # from config.json: the old code waited for replicas to fail

    # The ratio it names is the largest the rule of models/pop.py accepts, to the layer.
    assert skipped_layer_count(num_layers, float(largest), first_kept=deepstack) == k_max
    with pytest.raises(PopConfigError):
        skipped_layer_count(num_layers, (k_max + 1) / num_layers, first_kept=deepstack)


def test_pop_ratio_check_accepts_the_largest_ratio(tiny_dirs):
    """In process: the preflight check passes at the boundary and at 0 (POP off)."""
    from popserve.service.config import ServeConfig
    from popserve.service.launcher import StartupError, check_pop_ratio

    for model in tiny_dirs.values():
        num_layers, deepstack = _layers(model)
        k_max = num_layers - max(deepstack, 1)
        for ratio in (0.0, k_max / num_layers, (k_max + 0.4) / num_layers):
            check_pop_ratio(ServeConfig(model=str(model), pop_ratio=ratio).resolved())
        with pytest.raises(StartupError, match="largest pop_ratio"):
            check_pop_ratio(ServeConfig(model=str(model), pop_ratio=(k_max + 0.6) / num_layers).resolved())


def test_deploy_failure_names_the_replicas_error():
    """A stage that fails in its constructor is reported by its exception, not as
    'Deploying application popserve failed' (the cause was only in the replica logs)."""
    from popserve.service.launcher import _root_cause

    message = (
        "The deployment failed to start 3 times in a row. This may be due to a problem with its "
        "constructor or initial health check failing. See controller logs for details. Error:\n"
        "\x1b[36mray::ServeReplica:popserve:Prefill.initialize_and_get_metadata()\x1b[39m (pid=1)\n"
        "RuntimeError: Traceback (most recent call last):\n"
        '  File "/work/main/models/pop.py", line 27, in skipped_layer_count\n'
        "    raise PopConfigError(\n"
        "popserve.models.pop.PopConfigError: pop_ratio 0.9 would skip layer 1; the largest allowed k is 10")
    assert _root_cause(message) == "PopConfigError: pop_ratio 0.9 would skip layer 1; the largest allowed k is 10"
    assert _root_cause("no traceback here") is None


# ---- Ctrl-C while starting --------------------------------------------------------------------
def _pids_holding(text: str) -> set[int]:
    """Processes whose command line mentions `text` (Ray's processes name their session dir)."""
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if text in cmdline and state != "Z":
                found.add(int(entry.name))
    return found


def _descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in out:
                out.add(child)
                todo.append(child)
    return out


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
    except OSError:
        return b""


def _alive(pids: set[int]) -> set[int]:
    alive = set()
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            alive.add(pid)
    return alive


def free_test_port() -> int:
    with listening_socket() as sock:
        return sock.getsockname()[1]


def _wait_for(predicate, timeout: float, poll: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(poll)
    return False


@pytest.mark.parametrize("signame, when", [
    # Ctrl-C a few seconds in: Ray starting or the app deploying (ready takes 20 s or more on CPUs).
    ("SIGINT", "4s"),
    # SIGTERM once Serve's controller runs: after ray.init(), whose core worker installs a SIGTERM
    # handler of its own (it had the server abort with a crash dump, not stop).
    ("SIGTERM", "controller"),
])
def test_signal_while_starting_aborts_and_cleans_up(signame, when, own_ray_tmpdir):
    ray_tmp = own_ray_tmpdir
    port = free_test_port()
    proc = subprocess.Popen([*popserve_cmd(), "serve", "--port", str(port)], env=cli_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    started = threading.Event()

    def read():
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("popserve: starting"):  # printed once its signal handlers are in place
                started.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    seen: set[int] = set()

    def watch(done) -> bool:
        seen.update(_descendants(proc.pid))
        return done() or proc.poll() is not None

    def controller_runs() -> bool:
        return any(b"ServeController" in _cmdline(pid) for pid in seen)

    try:
        assert started.wait(120), "".join(lines)
        if when == "controller":
            assert _wait_for(lambda: watch(controller_runs), 120), "".join(lines)
        else:
            t_signal = time.monotonic() + float(when.rstrip("s"))
            _wait_for(lambda: watch(lambda: time.monotonic() > t_signal), 60)
        assert proc.poll() is None, "".join(lines)
        proc.send_signal(getattr(signal, signame))
        t0 = time.monotonic()
        rc = proc.wait(timeout=60)
        elapsed = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        reader.join(10)
    out = "".join(lines)
    assert rc == 128 + getattr(signal, signame), out
    assert "popserve: interrupted while starting" in out, out
    assert "popserve: serving" not in out, out  # it was aborted, not started and then stopped
    assert "Traceback" not in out, out
    assert elapsed < 60, elapsed
    assert seen, "no Ray process was seen: the test interrupted nothing"
    # Ray's processes share the fate of the server; give the kernel a moment to deliver it.
    _wait_for(lambda: not (_alive(seen) or _pids_holding(ray_tmp)), 15, poll=0.5)
    left = _alive(seen) | _pids_holding(ray_tmp)
    assert not left, {pid: _cmdline(pid)[:200] for pid in left}


def test_device_auto_names_the_gpu_that_torch_cannot_use(tmp_path, monkeypatch, caplog):
    """A machine whose NVIDIA driver is loaded but too old for torch's CUDA (CUDA 13 needs driver
    580), or a CPU-only torch beside a GPU: `device: auto` serves on the CPU and says why at start,
    instead of falling back without a word. No driver loaded: nothing to say."""
    import logging

    from popserve.models import loading
    from popserve.models.checkpoint import default_model_dir
    from popserve.service.config import ServeConfig

    driver = tmp_path / "version"
    assert loading.unusable_gpu("13.0", str(driver)) is None
    driver.write_text("NVRM version: NVIDIA UNIX x86_64 Kernel Module  535.104.05  Sat Aug 19 01:15:15 UTC 2023\n"
                      "GCC version:  gcc version 12.2.0 (Debian 12.2.0-14)\n")
    assert loading.unusable_gpu("13.0", str(driver)) == (
        "NVIDIA driver 535.104.05 is older than torch's CUDA 13.0 needs (driver 580 or newer)")
    assert loading.unusable_gpu("12.8", str(driver)).startswith("NVIDIA driver 535.104.05 is loaded, but torch finds")
    assert loading.unusable_gpu(None, str(driver)) == "NVIDIA driver 535.104.05 is loaded, but this torch is a CPU-only build"

    monkeypatch.setattr(loading, "NVIDIA_DRIVER_FILE", str(driver))  # the machine's driver, as a file here
    with caplog.at_level(logging.WARNING, logger="popserve"):
        cfg = ServeConfig(model=str(default_model_dir()), device="auto").resolved()
    assert cfg.device == "cpu"  # no GPU torch can use on this machine
    assert "device auto: serving on the CPU: NVIDIA driver 535.104.05" in caplog.text
