"""The layering check (tests/check_layers.py, `make layers`): the package passes it, and it fails, naming file, line
and import, on each kind of violation planted in a copy of the package."""
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CHECK = ROOT / "tests" / "check_layers.py"


def run_check(*args):
    return subprocess.run([sys.executable, str(CHECK), *args], capture_output=True, text=True, timeout=120)


def test_the_package_keeps_its_layers():
    r = run_check()
    assert r.returncode == 0, r.stderr
    n_files = len(list((ROOT / "adadecode").rglob("*.py")))
    assert f"layers: ok ({n_files} modules in 11 parts" in r.stdout  # every module was read and placed


@pytest.fixture
def copy(tmp_path) -> Path:
    """A copy of the package's modules (no data files) under tmp_path; returns tmp_path."""
    shutil.copytree(ROOT / "adadecode", tmp_path / "adadecode",
                    ignore=lambda d, names: [n for n in names if not n.endswith(".py") and not Path(d, n).is_dir()])
    assert run_check("--root", str(tmp_path)).returncode == 0
    return tmp_path


def plant(root: Path, rel: str, code: str) -> int:
    """Append `code` to the module `rel`; the line number of its last line."""
    path = root / rel
    text = path.read_text().rstrip("\n") + "\n\n\n" + code.strip("\n") + "\n"
    path.write_text(text)
    return len(text.splitlines())


@pytest.mark.parametrize("rel,code,says", [
    # an engine reaching up to the API, inside a function: function-local imports count
    ("adadecode/engines/torch.py", "def _planted():\n    from ..api import LLM",
     "engines may not import adadecode.api (api); engines may import model, errors"),
    # the bottom layer, absolute import of a face
    ("adadecode/model/config.py", "import adadecode.server", "model may not import adadecode.server (server)"),
    # siblings: a decoding method reading head files
    ("adadecode/decoding/driver.py", "def _planted():\n    from ..heads.files import load_heads",
     "decoding may not import adadecode.heads.files (heads)"),
    # the front door pulling in the web stack
    ("adadecode/__init__.py", "from .server import create_app", "front may not import adadecode.server (server)"),
    # anything below the faces importing the front door
    ("adadecode/heads/train.py", "from adadecode import LLM", "heads may not import adadecode (front)"),
    # the kernels reached from above the engines
    ("adadecode/decoding/vanilla.py", "def _planted():\n    import adadecode_cuda",
     "decoding may not import the extension adadecode_cuda"),
])
def test_a_planted_violation_fails_with_file_line_and_import(copy, rel, code, says):
    line = plant(copy, rel, code)
    r = run_check("--root", str(copy))
    assert r.returncode == 1
    assert f"{rel}:{line}: {says}" in r.stderr, r.stderr


def test_a_planted_circle_fails(copy):
    # within one part imports are free, but select imports cuda, which imports contract: contract -> select closes it
    line = plant(copy, "adadecode/engines/contract.py", "def _planted():\n    from .select import make_engine")
    r = run_check("--root", str(copy))
    assert r.returncode == 1
    # select imports every engine; the check names the first engine module on the circle (cpu, then cuda)
    assert re.search(r"import circle adadecode\.engines\.contract -> adadecode\.engines\.select -> "
                     r"adadecode\.engines\.(cpu|cuda)", r.stderr), r.stderr
    assert f"adadecode/engines/contract.py:{line} imports adadecode.engines.select" in r.stderr, r.stderr


def test_a_module_outside_the_table_fails(copy):
    (copy / "adadecode" / "extra.py").write_text('"""A new top-level module, not yet given its place."""\n')
    r = run_check("--root", str(copy))
    assert r.returncode == 1
    assert "adadecode/extra.py: adadecode.extra lies in no part of the layer table" in r.stderr, r.stderr
