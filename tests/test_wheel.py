"""A non-editable install works away from the checkout: the wheel carries the package, the launch scripts and the
topology files, and `launch.generate --topology=h100-1` runs the embedded model from another directory."""

import json
import os
import subprocess
import sys
import venv

import pytest

from conftest import REPO


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
  """A virtual environment (seeing this interpreter's packages for the dependencies) with qwenjax's wheel."""
  root = tmp_path_factory.mktemp("wheel")
  subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                  str(root / "dist"), str(REPO)], check=True, capture_output=True, timeout=600)
  [wheel] = (root / "dist").glob("qwenjax-*.whl")
  venv.create(root / "env", system_site_packages=True, with_pip=False)
  python = root / "env" / "bin" / "python"
  subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q", str(wheel)],
                 check=True, capture_output=True, timeout=600)
  away = root / "elsewhere"
  away.mkdir()
  return python, away


def _run(installed, *args, **env):
  python, away = installed
  return subprocess.run([str(python), *args], cwd=away, capture_output=True, text=True, timeout=900,
                        env={**os.environ, **env})


def test_the_wheel_is_imported_not_the_checkout(installed):
  proc = _run(installed, "-c", "import launch.generate, qwenjax, tpu_configs; "
              "print(qwenjax.__file__); print(launch.generate.__file__); print(tpu_configs.__file__)")
  assert proc.returncode == 0, proc.stderr[-3000:]
  for path in proc.stdout.split():
    assert "site-packages" in path and str(REPO) not in path, path


def test_topology_files_ship_with_the_wheel(installed):
  proc = _run(installed, "-m", "launch.plan", "--topology=h100-1")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "qwen2.5-7b" in proc.stdout


@pytest.mark.real_model
@pytest.mark.slow
def test_generate_with_a_topology_from_outside_the_checkout(installed, real_gguf_path):
  proc = _run(installed, "-m", "launch.generate", "--model=default", "--topology=h100-1", "--json",
              "--max_new_tokens=4", "--prompt=Say hi", QWENJAX_CACHE_DIR=str(real_gguf_path.parent))
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads(proc.stdout)
  assert out["usage"]["completion_tokens"] == len(out["token_ids"]) > 0
