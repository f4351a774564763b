"""The paged KV cache's real-model checks (tests/model/real_model_paged_checks.py: 32 slots at a 32K context,
int8 pages' perplexity and greedy agreement), run in a process of their own.

Why a process of their own: late in a full pytest run (after some 300 other tests in the same process), XLA:CPU
segfaulted while compiling the 32-slot paged decode program, twice, in `backend_compile_and_load`; the same
checks pass in a fresh process every time (four runs). Until that crash is understood, the checks keep it out of
the suite's process, and a crash here still fails this test with the child's output.
"""

import subprocess
import sys

import pytest

from conftest import REPO, users_xla_environ

pytestmark = pytest.mark.real_model


def test_paged_cache_on_the_real_model_in_a_fresh_process():
  proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", "-o",
                         "python_files=*.py", str(REPO / "tests" / "model" / "real_model_paged_checks.py")],
                        cwd=REPO, env=users_xla_environ(), capture_output=True, text=True, timeout=1800)
  print(proc.stdout[-4000:])
  assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
  assert "3 passed" in proc.stdout, proc.stdout[-3000:]
