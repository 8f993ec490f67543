"""`popserve serve`: a local Ray cluster when none is running, the app on it, Ctrl-C to stop."""
from __future__ import annotations

import errno
import os
import re
import signal
import socket
import sys
import threading
import time

from .config import ServeConfig

APP_NAME = "popserve"


class StartupError(RuntimeError):
    """popserve cannot start as configured; the message says why in one line (the CLI prints it)."""


# ---- checks before Ray starts ----------------------------------------------------------------
def joins_existing_cluster() -> bool:
    """Whether start() would join a running Ray cluster (this process's, RAY_ADDRESS's or the last
    `ray start`'s) rather than start a local one: Ray's own lookup, as ray.init() does it."""
    import ray

    if ray.is_initialized():
        return True
    try:
        from ray._private.services import get_ray_address_from_environment

        address = get_ray_address_from_environment(None, None)
    except Exception:  # a private API: should it move, RAY_ADDRESS alone decides
        address = os.environ.get("RAY_ADDRESS")
    return address not in (None, "", "local")


def check_port(host: str, port: int) -> None:
    """Fail at once when Serve's HTTP proxy could not listen on host:port: binds the socket the way
    the proxy does (ray/serve/_private/http_util.py), which otherwise says so only after Ray started.
    SO_REUSEADDR as the proxy's: a port with connections in TIME_WAIT is free. Without the proxy's
    SO_REUSEPORT: a port another server listens on is not (even another Serve's, which the kernel
    would otherwise let both bind and share the connections between)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    where = f"[{host}]:{port}" if family == socket.AF_INET6 else f"{host}:{port}"
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except socket.gaierror as exc:
            raise StartupError(f"cannot listen on {where}: unknown host {host!r} ({exc.strerror})") from None
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                why = "the port is already in use (choose another --port or stop what listens there)"
            elif exc.errno == errno.EADDRNOTAVAIL:
                why = f"{host} is not an address of this machine"
            elif exc.errno == errno.EACCES:
                why = "permission denied (ports below 1024 need privileges)"
            else:
                why = exc.strerror or str(exc)
            raise StartupError(f"cannot listen on {where}: {why}") from None


def check_pop_ratio(cfg: ServeConfig) -> None:
    """Fail at once when the model's prefill cannot skip pop_ratio of its decoder layers: the rule
    of models/pop.py, applied to the checkpoint's config.json (its replicas would fail it later)."""
    if cfg.pop_ratio == 0:
        return
    from transformers import AutoConfig

    from popserve.models.checkpoint import read_config, resolve_model_dir
    from popserve.models.families import family_for
    from popserve.models.pop import PopConfigError, max_pop_ratio, skipped_layer_count

    model_dir = resolve_model_dir(cfg.model)
    read_config(model_dir)  # a clean error when config.json is missing or not JSON
    try:
        fam = family_for(AutoConfig.from_pretrained(model_dir))
    except ValueError:
        raise
    except Exception as exc:
        raise StartupError(f"cannot read the model config in {model_dir}: {exc}") from None
    try:
        skipped_layer_count(fam.num_layers, cfg.pop_ratio, first_kept=fam.num_deepstack)
    except PopConfigError as exc:
        largest = max_pop_ratio(fam.num_layers, fam.num_deepstack)
        k = round(largest * fam.num_layers)
        hint = (f"the largest pop_ratio {model_dir} allows is {largest:.3f} (prefill skips {k} of its "
                f"{fam.num_layers} decoder layers)" if k > 0 else
                f"{model_dir} has too few decoder layers ({fam.num_layers}) to skip any: use pop_ratio 0")
        raise StartupError(f"{exc}. {hint[0].upper()}{hint[1:]}") from None


def preflight(cfg: ServeConfig) -> ServeConfig:
    """What can be checked before Ray starts; returns cfg resolved. The port first: it is cheap."""
    if not joins_existing_cluster():  # a joined cluster's proxies listen on its nodes, maybe already
        check_port(cfg.host, cfg.port)
    cfg = cfg.resolved()
    check_pop_ratio(cfg)
    return cfg


# ---- start / stop ----------------------------------------------------------------------------
_ERROR_LINE = re.compile(r"^\s*([A-Za-z_][\w.]*(?:Error|Exception|Exit)[\w.]*(?:\([\w.]+\))?): (.+)$")


def _root_cause(message: str) -> str | None:
    """The last `SomeError: text` line of a traceback in a Serve status message."""
    found = None
    for line in message.splitlines():
        m = _ERROR_LINE.match(line)
        if m:
            found = f"{m.group(1).split('.')[-1]}: {m.group(2).strip()}"
    return found


def deploy_failure_cause(app_name: str = APP_NAME) -> str | None:
    """Why the app's deployment failed, from the failed deployments' status messages (the
    replicas' constructor errors), in one line; None when Serve does not say."""
    from ray import serve

    try:
        app = serve.status().applications.get(app_name)
    except Exception:
        return None
    if app is None:
        return None
    causes = []
    for name, dep in app.deployments.items():
        if str(dep.status).split(".")[-1] in ("DEPLOY_FAILED", "UNHEALTHY") and dep.message:
            cause = _root_cause(dep.message)
            causes.append(f"{name}: {cause or dep.message.strip().splitlines()[0]}")
    if not causes:
        return None
    # Several stages usually fail for one reason: name it once.
    reasons = {c.split(": ", 1)[1] for c in causes}
    if len(reasons) == 1:
        names = ", ".join(c.split(": ", 1)[0] for c in causes)
        return f"{names}: {reasons.pop()}"
    return "; ".join(causes)


def init_ray() -> None:
    import ray

    if not ray.is_initialized():
        # Joins the cluster named by RAY_ADDRESS or started with `ray start`; otherwise starts an
        # embedded local one that lives as long as this process. Ray's metrics agent collects
        # every 10 s: every 2 s doubled its CPU on an idle server (docs/reliability.md).
        ray.init(logging_level="WARNING", include_dashboard=False)


def start(cfg: ServeConfig, wait_ready_s: float = 600.0) -> None:
    """Start (or join) Ray, deploy the app and wait until /health would say ready."""
    from ray import serve

    from .app import build_app

    init_ray()
    try:
        serve.start(http_options={"host": cfg.host, "port": cfg.port})
    except Exception as exc:
        if "Failed to bind to address" not in str(exc):
            raise
        raise StartupError(f"Serve's HTTP proxy cannot listen on {cfg.host}:{cfg.port}: the port is in use "
                           "or the address is not this machine's") from None
    try:
        serve.run(build_app(cfg), name=APP_NAME, route_prefix="/", blocking=False)
    except RuntimeError as exc:
        if not str(exc).startswith(f"Deploying application {APP_NAME} failed"):
            raise
        raise StartupError(f"popserve failed to start: {deploy_failure_cause() or exc}") from None
    deadline = time.monotonic() + wait_ready_s
    while time.monotonic() < deadline:
        status = serve.status().applications.get(APP_NAME)
        if status and status.status == "RUNNING":
            return
        if status and status.status in ("DEPLOY_FAILED", "UNHEALTHY"):
            raise StartupError(f"popserve failed to start: {deploy_failure_cause() or status.message}")
        time.sleep(0.5)
    raise TimeoutError("popserve did not become ready in time")


def stop(state: dict | None = None) -> None:
    """Serve's graceful shutdown (a KeyboardInterrupt skips the rest of it), then Ray's, which
    always runs to the end: serve_forever's signal handler sees state["phase"] == "final"."""
    import ray

    try:
        if ray.is_initialized():  # serve.shutdown() would otherwise start a cluster to shut down
            from ray import serve

            serve.shutdown()
    except KeyboardInterrupt:
        print("popserve: skipping the rest of Serve's shutdown", file=sys.stderr, flush=True)
    except Exception as exc:  # ray.shutdown() below still stops a local cluster
        print(f"popserve: Serve's shutdown failed: {exc}", file=sys.stderr, flush=True)
    finally:
        if state is not None:
            state["phase"] = "final"
        ray.shutdown()


def serve_forever(cfg: ServeConfig) -> int:
    """Check, start, serve until SIGINT/SIGTERM, stop. A signal while starting aborts the start
    (exit 128 + signal); a second one while stopping skips what is left of Serve's graceful
    shutdown; Ray's own shutdown of the local cluster always runs to the end."""
    cfg = preflight(cfg)
    state = {"phase": "starting", "signum": None}
    stopping = threading.Event()

    def on_signal(signum, frame):
        if state["signum"] is None:
            state["signum"] = signum
        if state["phase"] == "serving":
            stopping.set()
        elif state["phase"] in ("starting", "stopping"):
            raise KeyboardInterrupt  # the interrupted Ray call unwinds; handled below
        elif state["phase"] == "ray.init":
            # Not interrupted: a driver whose ray.init() was cut short crashed (SIGSEGV) on its way
            # out once in tests. The start is aborted as soon as ray.init() returns (seconds).
            os.write(2, b"popserve: aborting the start once Ray is up\n")
        # "final": ray.shutdown() is stopping the local cluster; let it finish.

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        print(f"popserve: starting {cfg.model} ({cfg.family}, pop_ratio={cfg.pop_ratio:.3f}, device={cfg.device})",
              flush=True)
        try:
            state["phase"] = "ray.init"
            init_ray()
            for sig in previous:  # Ray's core worker installs its own SIGTERM handler (a crash dump)
                signal.signal(sig, on_signal)
            state["phase"] = "starting"
            if state["signum"] is not None:
                raise KeyboardInterrupt
            start(cfg)
            if state["signum"] is not None:  # Ray swallowed the interrupt
                raise KeyboardInterrupt
            state["phase"] = "serving"
        except KeyboardInterrupt:
            state["phase"] = "stopping"
            print("popserve: interrupted while starting; shutting down", file=sys.stderr, flush=True)
            stop(state)
            return 128 + (state["signum"] or signal.SIGINT)
        except BaseException:
            state["phase"] = "stopping"
            stop(state)
            raise
        print(f"popserve: serving {cfg.model_name()} on http://{cfg.host}:{cfg.port}/v1 (Ctrl-C to stop)",
              flush=True)
        stopping.wait()
        print("popserve: shutting down", flush=True)
        state["phase"] = "stopping"
        stop(state)
        return 0
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

