"""Every file the project writes is written atomically (issue 35): adadecode/model/filesys.py's atomic_path and
write_atomic, killed at each point of a write, and a check that the CLI, head training and the benchmarks write
through them and nothing else."""
from __future__ import annotations

import ast
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from adadecode.model.filesys import atomic_path, check_file, stale_temporaries, temporary_name, write_atomic

ROOT = Path(__file__).resolve().parent.parent
FILESYS = ROOT / "adadecode" / "model" / "filesys.py"


def leftovers(folder: Path, keep: set[str]) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name not in keep)


def test_write_replaces_whole_and_leaves_no_temporary(tmp_path):
    f = tmp_path / "sub" / "r.json"
    write_atomic(f, "old")
    write_atomic(f, "new ✓")
    assert f.read_text() == "new ✓" and leftovers(f.parent, {"r.json"}) == []


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    f = tmp_path / "r.json"
    write_atomic(f, "old")
    with pytest.raises(RuntimeError):
        with atomic_path(f) as tmp:
            tmp.write_text("half")
            raise RuntimeError("the writer failed")
    assert f.read_text() == "old" and leftovers(tmp_path, {"r.json"}) == []


def test_the_temporary_keeps_the_suffix_and_stays_beside_the_target(tmp_path):
    t = temporary_name(tmp_path / "plot.png")
    assert t.parent == tmp_path and t.suffix == ".png" and t.name.startswith(".plot.png.tmp-")  # savefig's format


def test_a_folder_is_replaced_whole(tmp_path):
    out = tmp_path / "model"
    with atomic_path(out, directory=True) as tmp:
        (tmp / "a.json").write_text("{}")
    assert sorted(os.listdir(out)) == ["a.json"] and leftovers(tmp_path, {"model"}) == []


def test_stale_temporaries_are_removed_and_live_ones_kept(tmp_path):
    f = tmp_path / "h.safetensors"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    stale = tmp_path / f".h.safetensors.tmp-{dead_pid}-0123abcd.safetensors"
    stale_dir = tmp_path / f".h.safetensors.tmp-{dead_pid}-89abcdef.safetensors"
    live = tmp_path / f".h.safetensors.tmp-{os.getppid()}-0123abcd.safetensors"  # pytest's parent: alive
    other = tmp_path / f".g.safetensors.tmp-{dead_pid}-0123abcd.safetensors"  # another target's
    for p in (stale, live, other):
        p.write_bytes(b"partial")
    stale_dir.mkdir()
    (stale_dir / "x").write_text("x")
    assert sorted(stale_temporaries(f)) == sorted([stale, stale_dir])
    write_atomic(f, b"heads")
    assert leftovers(tmp_path, {"h.safetensors"}) == sorted([live.name, other.name])


@pytest.mark.parametrize("make,kind", [(lambda p: p.mkdir(), "a directory"), (lambda p: os.mkfifo(p), "a FIFO"),
                                       (None, "a character device")])
def test_check_file_names_what_a_path_is(tmp_path, make, kind):
    p = Path("/dev/zero") if make is None else tmp_path / "x"
    if make is not None:
        make(p)
    with pytest.raises(ValueError, match=rf"{p}: is {kind}.*, not a head file"):
        check_file(p, "head file")
    with pytest.raises(FileNotFoundError, match="no such head file"):
        check_file(tmp_path / "nothing", "head file")


# ---- killed at every point of a write ----------------------------------------------------------------------------
# A child that loads filesys.py from its file (no torch: it starts in tens of ms) and writes PAYLOAD to the target;
# at the chosen point it says "paused" and waits to be killed. The points: inside the writer's block with half the
# bytes written, in the fsync of the temporary, just before the rename, and after it (in the folder's fsync).
CHILD = textwrap.dedent("""
    import importlib.util, os, sys, time
    spec = importlib.util.spec_from_file_location("filesys", sys.argv[1])
    fs = importlib.util.module_from_spec(spec); spec.loader.exec_module(fs)
    target, point, size = sys.argv[2], sys.argv[3], int(sys.argv[4])
    payload = bytes(i % 251 for i in range(size))

    def pause():
        print("paused", flush=True)
        time.sleep(60)

    fsync, replace, calls = os.fsync, os.replace, []
    def my_fsync(fd):
        calls.append(fd)
        if point == "fsync" and len(calls) == 1 or point == "after" and len(calls) == 2:
            pause()
        return fsync(fd)
    def my_replace(a, b):
        if point == "replace":
            pause()
        return replace(a, b)
    os.fsync, os.replace = my_fsync, my_replace
    with fs.atomic_path(target) as tmp:
        with open(tmp, "wb") as f:
            f.write(payload[:size // 2])
            f.flush()
            if point == "write":
                pause()
            f.write(payload[size // 2:])
    print("done", flush=True)
""")


def payload(size: int) -> bytes:
    return bytes(i % 251 for i in range(size))


def write_in_child(target: Path, point: str, size: int, kill: bool = True) -> str:
    """Run the child; kill it with SIGKILL once it pauses (at `point`). -> its last word."""
    p = subprocess.Popen([sys.executable, "-c", CHILD, str(FILESYS), str(target), point, str(size)],
                         stdout=subprocess.PIPE, text=True)
    word = p.stdout.readline().strip()
    if kill:
        os.kill(p.pid, signal.SIGKILL)
    p.wait(timeout=60)
    p.stdout.close()
    return word


@pytest.mark.parametrize("point", ["write", "fsync", "replace", "after"])
@pytest.mark.parametrize("existed", [False, True])
def test_a_kill_at_any_point_leaves_the_old_file_or_the_new_one(tmp_path, point, existed):
    target = tmp_path / "results.json"
    if existed:
        target.write_bytes(b"old results")
    assert write_in_child(target, point, 200_000) == "paused"
    on_disk = target.read_bytes() if target.exists() else None
    new = payload(200_000)
    if point == "after":
        assert on_disk == new
    else:
        assert on_disk == (b"old results" if existed else None)
    # the next write of the target removes what the killed one left
    assert write_in_child(target, "none", 1000, kill=False) == "done"
    assert target.read_bytes() == payload(1000) and leftovers(tmp_path, {"results.json"}) == []


# ---- every write goes through the helper ---------------------------------------------------------------------------
WRITERS = {"write_text", "write_bytes", "savefig", "save_file", "save", "dump"}  # Path.write_*, fig, safetensors, torch/np, json


def _unsafe_writes(tree: ast.AST) -> list[tuple[int, str]]:
    """Calls that write a file other than through atomic_path: a writer method/function whose first argument is
    not a name bound by `with atomic_path(...) as NAME` (or str(NAME)), and open/tarfile.open in a write mode
    outside such a block. Appends ("a": logs, the resumable requests.jsonl) are not writes of a whole file."""
    out = []

    def visit(node, safe: set[str]):
        if isinstance(node, ast.With):
            names = set(safe)
            for item in node.items:
                c = item.context_expr
                if isinstance(c, ast.Call) and getattr(c.func, "id", getattr(c.func, "attr", None)) == "atomic_path" \
                        and isinstance(item.optional_vars, ast.Name):
                    names.add(item.optional_vars.id)
            safe = names
        if isinstance(node, ast.Call):
            name = getattr(node.func, "attr", None) or getattr(node.func, "id", None)
            args = list(node.args)

            def bound(a) -> bool:
                if isinstance(a, ast.Call) and getattr(a.func, "id", None) == "str" and a.args:
                    a = a.args[0]
                return isinstance(a, ast.Name) and a.id in safe

            if name in ("write_text", "write_bytes") and isinstance(node.func, ast.Attribute):
                if not bound(node.func.value):
                    out.append((node.lineno, ast.unparse(node)[:80]))
            elif name == "open":
                mode = args[1] if len(args) > 1 else next((k.value for k in node.keywords if k.arg == "mode"), None)
                mode = mode.value if isinstance(mode, ast.Constant) else ""
                if isinstance(mode, str) and any(c in mode for c in "wx+") and not (args and bound(args[0])):
                    out.append((node.lineno, ast.unparse(node)[:80]))
            elif name in ("savefig", "save_file", "save") and len(args) >= 1:
                target = args[1] if name in ("save_file", "save") and len(args) > 1 else args[0]
                if name == "save" and getattr(node.func, "value", None) is not None and \
                        getattr(node.func.value, "id", None) not in ("torch", "np", "numpy"):
                    pass  # another object's save(): not a file
                elif not bound(target):
                    out.append((node.lineno, ast.unparse(node)[:80]))
            elif name == "dump" and getattr(getattr(node.func, "value", None), "id", None) == "json":
                out.append((node.lineno, ast.unparse(node)[:80]))  # to an open file: write json.dumps(...) instead
        for child in ast.iter_child_nodes(node):
            visit(child, safe)

    visit(tree, set())
    return out


def test_every_file_is_written_through_the_atomic_helper():
    files = [*(ROOT / "adadecode").rglob("*.py"), *(ROOT / "bench").rglob("*.py")]
    bad = []
    for f in files:
        if f == FILESYS:
            continue
        for line, call in _unsafe_writes(ast.parse(f.read_text(), str(f))):
            bad.append(f"{f.relative_to(ROOT)}:{line}: {call}")
    assert not bad, "writes that bypass adadecode.model.filesys.atomic_path:\n" + "\n".join(bad)


def test_the_write_check_finds_each_kind_of_bypass():
    src = textwrap.dedent("""
        Path(p).write_text("x")
        open(p, "w")
        fig.savefig(path)
        torch.save(d, p)
        save_file(t, str(p))
        json.dump(r, f)
        with atomic_path(out) as tmp:
            tmp.write_text("ok")
            save_file(t, str(tmp))
            fig.savefig(tmp)
            open(tmp, "wb")
        open(log, "a")
    """)
    assert [line for line, _ in _unsafe_writes(ast.parse(src))] == [2, 3, 4, 5, 6, 7]
