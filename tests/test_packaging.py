"""What a non-editable install ships: setup.py's build_py copies the CUDA C kernels into the package, where their
launchers look when the source tree is absent."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_build_py_ships_the_cuda_c_sources(tmp_path):
    env = dict(os.environ, LRKERN_SKIP_EXT="1")  # build_py only: no C++ compile
    run = subprocess.run([sys.executable, "setup.py", "-q", "build_py", "--build-lib", str(tmp_path)], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    sources = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))
    assert {p.name for p in sources} >= {"lif.cu", "stm.cu"}
    for src in sources:
        assert (tmp_path / "lrkern" / "_cuda" / src.name).read_bytes() == src.read_bytes(), src.name
    shipped = tmp_path / "lrkern" / "_cuda" / "lif.cu"
    # The launcher's fallback path is exactly where build_py put it (relative to the installed module).
    launcher = tmp_path / "lrkern" / "kernels" / "cuda_lif.py"
    assert launcher.is_file() and (launcher.resolve().parents[1] / "_cuda" / "lif.cu") == shipped.resolve()
