"""The PTX check quoted by notebook 14: with the installed Triton, the W4A4 group loop compiled for sm_90
waits for each group's INT8 MMAs before the fp32 rescale, in both loop forms (so the two do not overlap).
If a Triton release starts pipelining the skewed form, this fails and the notebook's text needs updating.
The compile runs in a subprocess without TRITON_INTERPRET (the test session sets it)."""

import json
import os
import subprocess
import sys
from pathlib import Path

LIB = Path(__file__).resolve().parents[2] / "lib"


def test_group_loop_waits_for_every_groups_mmas():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(LIB) + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, "-m", "mlsys24.quant.wgmma_check", "--json"], env=env, check=True,
                         capture_output=True, text=True, timeout=300).stdout
    r = json.loads(out.strip().splitlines()[-1])
    assert set(r) == {"serial", "skewed"}
    for form in r.values():
        assert form["wgmma"] >= 2                 # INT8 tensor-core MMAs in the loop body
        assert form["waits"] and max(form["waits"]) == 0
