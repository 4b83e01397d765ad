"""The layering of the package adadecode, checked: which part may import which, and no import circles.

    python3 tests/check_layers.py [--root DIR]       (`make layers`; tests/test_layers.py runs it, so CI does)

The parts, bottom to top, and what each may import (PARTS below is the table itself):

    errors    adadecode/errors.py  BadOption: a refused value that names its field          nothing of adadecode
    model     adadecode/model/     the checkpoint in: config, weights, tokenizer, loaders   errors
    engines   adadecode/engines/   the contract, the engines behind it, their options       model, errors
    decoding  adadecode/decoding/  methods on any engine: vanilla, AdaDecode, LayerSkip     engines, model, errors
    heads     adadecode/heads/     head files, their data, training, evaluation             engines, model, errors
    testing   adadecode/testing/   what only tests and benchmarks use: parity, trace, the   engines, decoding, model,
                                   CPU probes; nothing of the package imports it             errors
    api       adadecode/api.py     adadecode.LLM                                            the four parts above
    server    adadecode/server.py  the OpenAI-compatible server                             api and below
    cli       adadecode/cli.py     python -m adadecode ...                                  server, api and below
    main      adadecode/__main__.py                                                         cli
    front     adadecode/__init__.py, the front door: what `import adadecode` gives         api and below, never
                                   the server or the CLI (importing adadecode loads no web stack); nothing imports it

decoding and heads are siblings: a decoding method takes Head objects from its caller and never reads a head file;
heads train and evaluate without running a decoding method. Only the engines import the compiled extensions
(adadecode_cuda, adadecode_emu, adadecode_cpu): everything above reaches the kernels through an engine, except the
testing seam, which reaches the CPU binding's probes (adadecode_cpu.testing) that no engine uses.

Where the table puts what an engine needs:
* Head (engines/head.py) and the sampling rule (engines/sampling.py) sit in engines, not in heads and decoding:
  they are what the contract's head() and final() compute. TorchEngine runs Head.probs and sampling.sample, and
  the CUDA kernels reproduce both bit for bit. Above them, heads/ stores and trains Heads and decoding/ only picks
  sampling settings (make_sampling).
* errors.py (BadOption) is the floor: every part raises it, and it imports nothing. testing/ (the parity criterion,
  trace replay, the CPU probes) serves only tests and benchmarks: it sits above engines and decoding, may import
  the CPU binding's probes (adadecode_cpu.testing), and no part imports it.
* The graphed baseline (decoding/graphed.py) is a decoding method over a TorchEngine's state that returns a
  decoding Generation; in engines it would import decoding.
* Why an engine cannot run here is said by the engine's own module (engines/cuda.py: cuda_unavailable_reason,
  emu_unavailable_reason); engines/select.py (make_engine) imports the engines and no engine imports it. A new
  engine (engines/cpu.py) goes the same way: its reason beside it, its name in select.py.

Every import statement counts: at module level, inside functions, relative or absolute. An import of a package
module resolves to that module (`from .heads import files` is adadecode.heads.files). Within one part any import
is allowed as long as no circle forms, across the whole package. Dynamic imports (importlib) are not read; the
package has none of its own modules. A module that lies in no part is an error, so a new folder or top-level
module must be given its place here before the check passes.
"""
from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

PACKAGE = "adadecode"
BELOW_API = ("decoding", "heads", "engines", "model", "errors")
# part: (the modules it holds, as dotted prefixes; the parts it may import)
PARTS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "errors": (("adadecode.errors",), ()),
    "model": (("adadecode.model",), ("errors",)),
    "engines": (("adadecode.engines",), ("model", "errors")),
    "decoding": (("adadecode.decoding",), ("engines", "model", "errors")),
    "heads": (("adadecode.heads",), ("engines", "model", "errors")),
    "testing": (("adadecode.testing",), ("engines", "decoding", "model", "errors")),
    "api": (("adadecode.api",), BELOW_API),
    "server": (("adadecode.server",), ("api",) + BELOW_API),
    "cli": (("adadecode.cli",), ("server", "api") + BELOW_API),
    "main": (("adadecode.__main__",), ("cli",)),
    "front": (("adadecode",), ("api",) + BELOW_API),
}
EXTENSIONS = ("adadecode_cuda", "adadecode_emu", "adadecode_cpu")  # compiled modules; imported by the parts in EXTENSION_USERS only
EXTENSION_USERS = ("engines", "testing")


def part_of(module: str) -> str | None:
    """The part holding `module`: the longest prefix of PARTS that names it or a package above it."""
    best, length = None, -1
    for part, (prefixes, _) in PARTS.items():
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > length and (p != PACKAGE or module == p):
                best, length = part, len(p)
    return best


def modules_under(root: Path) -> dict[str, tuple[Path, bool]]:
    """{dotted name: (file, is a package __init__)} for every .py file of the package under `root`."""
    out = {}
    for f in sorted((root / PACKAGE).rglob("*.py")):
        rel = f.relative_to(root).with_suffix("").parts
        if rel[-1] == "__init__":
            out[".".join(rel[:-1])] = (f, True)
        else:
            out[".".join(rel)] = (f, False)
    return out


def imports_of(module: str, path: Path, is_pkg: bool, known: set[str]) -> list[tuple[int, str]]:
    """(line, imported name) for every import in the file: package modules resolved to the module, others as written."""
    here = module.split(".") if is_pkg else module.split(".")[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[: len(here) - node.level + 1]
                base = ".".join(base + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            for a in node.names:
                sub = f"{base}.{a.name}"
                found.append((node.lineno, sub if sub in known else base))
    return sorted(set(found))


def circles(edges: dict[str, dict[str, int]]) -> list[list[str]]:
    """One import circle (a list of modules, the first repeated at the end) per strongly connected component."""
    index, low, stack, on, comps, counter = {}, {}, [], set(), [], [0]

    def visit(v):  # Tarjan's algorithm; the package is small enough for recursion
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(set(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    out = []
    for comp in comps:
        start = min(comp)
        path, seen = [start], {start}
        while True:  # walk inside the component until the walk closes on a module it has seen
            nxt = min(w for w in edges[path[-1]] if w in comp)
            if nxt in seen:
                path = path[path.index(nxt):] + [nxt]
                break
            path.append(nxt)
            seen.add(nxt)
        out.append(path)
    return out


def check(root: Path) -> tuple[list[str], str]:
    """(the violations, one message each naming file, line and import; a summary line)."""
    mods = modules_under(root)
    if not mods:
        return [f"{root / PACKAGE}: no modules found"], ""
    known = set(mods)
    errors, edges, n_imports = [], {}, 0
    for module, (path, is_pkg) in mods.items():
        rel = path.relative_to(root)
        part = part_of(module)
        if part is None:
            errors.append(f"{rel}: {module} lies in no part of the layer table (PARTS in tests/check_layers.py)")
        allowed = PARTS[part][1] if part else ()
        for line, name in imports_of(module, path, is_pkg, known):
            top = name.split(".")[0]
            if top in EXTENSIONS:
                if part and part not in EXTENSION_USERS:
                    errors.append(f"{rel}:{line}: {part} may not import the extension {name} "
                                  f"(only {', '.join(EXTENSION_USERS)} may)")
                continue
            if top != PACKAGE:
                continue
            n_imports += 1
            if name in known and name != module:
                edges.setdefault(module, {}).setdefault(name, line)
            target = part_of(name)
            if target is None and part:
                errors.append(f"{rel}:{line}: imports {name}, which lies in no part of the layer table")
            elif part and target != part and target not in allowed:
                may = ", ".join(allowed) if allowed else "nothing of adadecode"
                errors.append(f"{rel}:{line}: {part} may not import {name} ({target}); {part} may import {may}")
    for path in circles(edges):
        steps = ", ".join(f"{mods[a][0].relative_to(root)}:{edges[a][b]} imports {b}" for a, b in zip(path, path[1:]))
        errors.append(f"import circle {' -> '.join(path)}: {steps}")
    summary = f"{len(mods)} modules in {len({part_of(m) for m in mods} - {None})} parts, {n_imports} imports of adadecode"
    return errors, summary


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", type=Path, default=Path(__file__).resolve().parent.parent,
                   help="the folder that holds the package adadecode/ (default: this repository)")
    args = p.parse_args(argv)
    errors, summary = check(args.root)
    for e in errors:
        print(e, file=sys.stderr)
    if errors:
        print(f"layers: {len(errors)} violation(s); the table and the reasons: tests/check_layers.py", file=sys.stderr)
        return 1
    print(f"layers: ok ({summary})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
