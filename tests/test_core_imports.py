"""The core library imports with torch + numpy only: no Jupyter, no plotly, no GPU."""

import subprocess
import sys

from mlsys24.paths import REPO_ROOT

BLOCKED = ["plotly", "ipywidgets", "IPython", "jupyter_client", "papermill", "pandas", "sklearn", "triton"]

PROBE = f"""
import sys
class _Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in {BLOCKED!r}:
            raise ImportError('blocked for this test: ' + name)
        return None
sys.meta_path.insert(0, _Block())
import mlsys24, mlsys24.bench, mlsys24.params, mlsys24.paths, mlsys24.papers
import mlsys24.bench.__main__
print('ok')
"""


def test_core_imports_without_optional_packages():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, cwd=REPO_ROOT,
                         env={"PATH": "/usr/bin:/bin", "CUDA_VISIBLE_DEVICES": ""})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
