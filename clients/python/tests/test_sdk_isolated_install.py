"""The client installs alone into a fresh virtual environment, without torch or ray."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest

CLIENT_DIR = Path(__file__).resolve().parents[1]  # clients/python


def run(*cmd: str | Path, cwd: Path) -> str:
    # Outside this repository, and with no PYTHONPATH, so nothing leaks in from the dev venv.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    done = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{cmd} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.mark.slow
def test_fresh_venv_installs_only_the_client(tmp_path):
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True, clear=True).create(env_dir)
    python = env_dir / ("Scripts" if sys.platform == "win32" else "bin") / "python"

    # A regular (not editable) install, as a user gets it, from a copy: building writes into
    # the source folder, and the repository's should stay as it is.
    source = tmp_path / "src"
    shutil.copytree(CLIENT_DIR, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__", ".*"))
    run(python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", source, cwd=tmp_path)

    installed = {p["name"].lower() for p in json.loads(run(python, "-m", "pip", "list", "--format=json", cwd=tmp_path))}
    assert "popserve-client" in installed
    assert {"httpx", "pydantic"} <= installed
    assert not {"torch", "ray", "torchvision", "transformers"} & installed, sorted(installed)

    check = (
        "import sys, popserve_client as pc;"
        "assert pc.__file__.startswith(sys.prefix), pc.__file__;"
        "c = pc.Client('http://127.0.0.1:9'); c.close();"
        "assert not {'torch', 'ray', 'PIL'} & set(sys.modules), sorted(sys.modules);"
        "print(pc.__version__)"
    )
    assert run(python, "-c", check, cwd=tmp_path).strip() == "0.1.0"
    # The console script was installed too.
    assert (python.parent / "popserve-chat").exists()
    assert "usage: popserve-chat" in run(python.parent / "popserve-chat", "--help", cwd=tmp_path)
