"""The prepared device check (`python -m launch.bench.kernels`) runs end to end in its --smoke mode on CPU (Pallas
interpret mode): every case is there and every kernel matches its reference, so a session with a GPU or TPU
runs it as is."""

import json
import math
import subprocess
import sys

import pytest

from conftest import REPO

pytestmark = pytest.mark.slow


def test_the_device_check_runs_and_every_kernel_matches_its_reference(tmp_path):
  out = tmp_path / "kernels.json"
  proc = subprocess.run([sys.executable, "-m", "launch.bench.kernels", "--smoke", f"--output={out}"], cwd=REPO,
                        capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-4000:]
  report = json.loads(out.read_text())
  assert json.loads(proc.stdout) == report
  names = [c["name"] for c in report["cases"]]
  matmuls = [f"{m}_{s}_m{r}" for m in ("w8a16", "w8a8") for s in ("up", "down", "lm_head") for r in (1, 3)]
  decode = [f"decode_7b_batch1_{q}_{i}" for q in ("float", "int8") for i in ("xla", "pallas")]
  spec = ["spec_7b_batch1_plain", "spec_7b_batch1_draft"]
  assert names == ["rpa_decode", "rpa_decode_int8", "rpa_mixed", "segment_attn", *matmuls, "gmm_decode", "gmm_prefill",
                   *decode, *spec]
  for case in report["cases"]:
    if "max_abs_diff" in case:  # float32 in smoke mode: the kernels' bar is 1e-5 of the output's scale
      assert case["max_abs_diff"] <= 1e-5 * max(1.0, case["max_abs_reference"]), case
      assert case["kernel_s"] > 0 and case["reference_s"] > 0 and case["bytes"] > 0
    elif "seconds_per_token" in case:
      # A difference of two timings: its sign on a loaded 2-core CI machine is the machine's, not the engine's.
      assert math.isfinite(case["seconds_per_token"]) and case["weight_bytes"] > 0
    else:
      assert math.isfinite(case["seconds_per_step"]) and case["tokens_per_step"] >= 1, case
  draft = report["cases"][-1]
  assert draft["spec_proposed_tokens"] > 0 and math.isfinite(draft["seconds_per_step"]), draft
  int8 = next(c for c in report["cases"] if c["name"] == "decode_7b_batch1_int8_xla")
  fp = next(c for c in report["cases"] if c["name"] == "decode_7b_batch1_float_xla")
  assert int8["weight_bytes"] < 0.5 * fp["weight_bytes"]
