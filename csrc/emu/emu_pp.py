"""emu_pp.py: the emulated device's view of a .cu file of csrc/ (see cuda_emu.h). Rewrites only what a host C++
compiler cannot parse or what the emulator must see, keeping every line where it was (messages point at the
original file through a #line directive):

  k<<<g, b, s, st>>>(args)          ->  k | ::emu::cfg(__FILE__, __LINE__, g, b, s, st)(args)
  extern __shared__ T name[];       ->  T* name = ::emu::dyn_smem<T>();
  __shared__ T a[N], b[M];          ->  static T a[N], b[M]; ::emu::shared_init(&a, sizeof a); ...  (poisoned per block)
  asm volatile("ptx" : outs : ins)  ->  ::emu::ptx_call("ptx", std::make_tuple(&out...), {::emu::ptx_in(in)...})

    python emu_pp.py SRC DST
"""
from __future__ import annotations

import re
import sys


def _skip_string(s: str, i: int) -> int:
    q = s[i]
    i += 1
    while s[i] != q:
        i += 2 if s[i] == "\\" else 1
    return i + 1


def _balanced(s: str, i: int) -> int:
    """s[i] == '(' -> the index after its matching ')'."""
    depth = 0
    while True:
        c = s[i]
        if c in "\"'":
            i = _skip_string(s, i)
            continue
        depth += c == "("
        depth -= c == ")"
        i += 1
        if c == ")" and depth == 0:
            return i


def _split_top(s: str, sep: str) -> list[str]:
    parts, depth, cur, i = [], 0, "", 0
    while i < len(s):
        c = s[i]
        if c in "\"'":
            j = _skip_string(s, i)
            cur, i = cur + s[i:j], j
            continue
        depth += c in "([{"
        depth -= c in ")]}"
        if c == sep and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += c
        i += 1
    parts.append(cur)
    return parts


def _operands(section: str) -> list[str]:
    out = []
    for op in _split_top(section, ","):
        if op.strip():
            m = re.match(r'\s*"[^"]*"\s*\((.*)\)\s*$', op, re.S)
            if not m:
                raise SystemExit(f"emu_pp: cannot parse the asm operand {op!r}")
            out.append(m.group(1))
    return out


def _rewrite_asm(src: str) -> str:
    out, i = [], 0
    pat = re.compile(r"\b(?:asm|__asm__)\s*(?:volatile|__volatile__)?\s*\(")
    while m := pat.search(src, i):
        out.append(src[i:m.start()])
        end = _balanced(src, m.end() - 1)
        body = src[m.end():end - 1]
        secs = _split_top(body, ":")  # a top-level "::" is two separators (no outputs)
        outs = _operands(secs[1]) if len(secs) > 1 else []
        ins = _operands(secs[2]) if len(secs) > 2 else []
        o = ", ".join(f"&({e})" for e in outs)
        n = ", ".join(f"::emu::ptx_in({e})" for e in ins)
        out.append(f"::emu::ptx_call({secs[0].strip()}, std::make_tuple({o}), {{{n}}})" + "\n" * body.count("\n"))
        i = end
    out.append(src[i:])
    return "".join(out)


def _static_shared(m: re.Match) -> str:
    decl = m.group(1)
    names = []
    for part in _split_top(decl, ","):
        head = part.split("[", 1)[0]
        names.append(re.findall(r"\w+", head)[-1])
    inits = " ".join(f"::emu::shared_init(&{n}, sizeof {n});" for n in names)  # & : scalars too
    return f"static {decl}; {inits}"


def rewrite(src: str) -> str:
    src = re.sub(r"<<<(.*?)>>>", lambda m: " | ::emu::cfg(__FILE__, __LINE__, " + m.group(1) + ")", src, flags=re.S)

    def dyn(m: re.Match) -> str:
        decl = re.sub(r"__align__\s*\(\s*\d+\s*\)", "", m.group(1)).strip()
        return f"{decl}* {m.group(2)} = ::emu::dyn_smem<{decl}>();"

    src = re.sub(r"extern\s+__shared__\s+([^;]*?)\b(\w+)\s*\[\s*\]\s*;", dyn, src)
    src = re.sub(r"(?<!#define )\b__shared__\s+([^;]*);", _static_shared, src)
    return _rewrite_asm(src)


def preprocess(src_path: str, dst_path: str, shown_as: str | None = None) -> None:
    with open(src_path) as f:
        text = f.read()
    head = '#include "cuda_emu.h"\n' if src_path.endswith(".cu") else ""
    with open(dst_path, "w") as f:
        f.write(head + f'#line 1 "{shown_as or src_path}"\n' + rewrite(text))


if __name__ == "__main__":
    preprocess(sys.argv[1], sys.argv[2])
