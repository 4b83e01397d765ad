"""Tokenizer: an HF `tokenizer.json` (via `tokenizers`) plus what `tokenizer_config.json` adds:
BOS/EOS, whether to prepend BOS, and the chat template (rendered with jinja2 as transformers does)."""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import BadOption


def check_text(text, what: str, param: str | None = None) -> None:
    """Refuse what the tokenizer cannot take, naming where: a lone surrogate (what Python makes of invalid UTF-8 in
    argv, or a JSON "\\ud800") reaches the Rust tokenizer as a TypeError otherwise. `param`: the request field the
    text came from (the error is then a BadOption carrying it)."""
    error = (lambda msg: BadOption(msg, param=param)) if param else ValueError
    if not isinstance(text, str):
        raise error(f"{what} must be a string, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise error(f"{what} is not valid Unicode text: {text[e.start:e.end]!r} at character {e.start} "
                    "(a lone surrogate, or invalid UTF-8 bytes)") from None


class Tokenizer:
    def __init__(self, tokenizer_json: str, config: dict | None = None, source: str = "tokenizer.json",
                 config_source: str | None = None):
        from tokenizers import Tokenizer as HFTokenizer

        try:
            self.tok = HFTokenizer.from_str(tokenizer_json)
        except Exception as e:
            raise ValueError(f"{source}: not a valid tokenizer.json ({e})") from None
        self.config = dict(config or {})
        self.source = source
        where = config_source or source  # the file the config's values came from, for its errors

        def tok_id(key):
            v = self.config.get(key)
            v = v.get("content") if isinstance(v, dict) else v
            if v is None:
                return None
            if not isinstance(v, str):
                raise ValueError(f"{where}: '{key}' is {self.config.get(key)!r}; expected a token's text")
            check_text(v, f"{where}: '{key}'")
            i = self.tok.token_to_id(v)
            if i is None:  # an EOS the model can never emit would let every generation run to max_new_tokens
                raise ValueError(f"{where}: '{key}' is {v!r}, which is not a token of this tokenizer")
            return i

        self.bos_id = tok_id("bos_token")
        self.eos_id = tok_id("eos_token")
        self.add_bos = self.config.get("add_bos_token", False)
        if not isinstance(self.add_bos, bool):
            raise ValueError(f"{where}: 'add_bos_token' is {self.add_bos!r}; expected true or false")
        self.chat_template = self.config.get("chat_template")
        if self.chat_template is not None and not isinstance(self.chat_template, str):
            raise ValueError(f"{where}: 'chat_template' is {self.chat_template!r}; expected a string")
        if self.chat_template is not None:
            check_text(self.chat_template, f"{where}: 'chat_template'")

    @classmethod
    def from_dir(cls, path: str | Path) -> "Tokenizer":
        path = Path(path)
        tj = path / "tokenizer.json"
        if not tj.is_file():
            raise FileNotFoundError(f"{tj}: missing (the checkpoint needs a tokenizer.json)")
        cfg_path = path / "tokenizer_config.json"
        from .config import read_json

        cfg = read_json(cfg_path) if cfg_path.is_file() else {}
        templates = cfg.get("chat_template")
        if isinstance(templates, list):  # a list of named templates: take the default one
            if not all(isinstance(t, dict) and "template" in t for t in templates):
                raise ValueError(f"{cfg_path}: 'chat_template' is a list whose entries are not "
                                 "{\"name\": ..., \"template\": ...} objects")
            cfg["chat_template"] = next((t["template"] for t in templates if t.get("name") == "default"), None)
        tmpl = path / "chat_template.jinja"
        if cfg.get("chat_template") is None and tmpl.is_file():
            cfg["chat_template"] = tmpl.read_text()
        try:
            text = tj.read_text()
        except UnicodeDecodeError as e:
            raise ValueError(f"{tj}: not UTF-8 text ({e})") from None
        return cls(text, cfg, source=str(tj), config_source=str(cfg_path))

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special: bool = True) -> list[int]:
        check_text(text, "prompt", param="prompt")
        ids = self.tok.encode(text, add_special_tokens=False).ids
        if add_special and self.add_bos and self.bos_id is not None and (not ids or ids[0] != self.bos_id):
            ids = [self.bos_id] + ids
        return ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=True)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        if not self.chat_template:
            raise ValueError(f"{self.source}: the tokenizer has no chat template (tokenizer_config.json 'chat_template')")
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(msg):
            raise jinja2.exceptions.TemplateError(msg)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
        env.globals["raise_exception"] = raise_exception
        env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False: json.dumps(x, indent=indent, ensure_ascii=ensure_ascii)

        def special(key):
            v = self.config.get(key)
            return v.get("content") if isinstance(v, dict) else (v or "")

        return env.from_string(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt,
            bos_token=special("bos_token"), eos_token=special("eos_token"))

    def encode_messages(self, messages: list[dict]) -> list[int]:
        """Chat messages ({"role": ..., "content": ...}) rendered with the chat template, ready for the reply."""
        import jinja2

        try:
            text = self.apply_chat_template(messages)
        except jinja2.exceptions.TemplateError as e:
            raise ValueError(f"{self.source}: the chat template refused these messages ({e})") from None
        bos = self.config.get("bos_token")
        bos = bos.get("content") if isinstance(bos, dict) else bos
        # the template already wrote BOS where the model wants it
        return self.encode(text, add_special=not (bos and text.startswith(bos)))

    def encode_chat(self, user_text: str) -> list[int]:
        return self.encode_messages([{"role": "user", "content": user_text}])


class StreamDecoder:
    """Turns a growing list of token ids into text pieces whose concatenation is the decoded text.

    A piece is held back while the text ends in an incomplete UTF-8 sequence (a byte-level BPE token can carry
    part of a character). Each step decodes only a window of recent tokens (the ones since the piece before the
    last): the window's first token is decoded the same way in both decodes, so SentencePiece's dropped leading
    space cancels out, and a token costs the same however long the text is.

    The pieces concatenate to `decode(ids)` for valid text, and for any bytes with byte-level BPE. A byte-fallback
    (SentencePiece) decoder turns a whole run of byte tokens into U+FFFDs when the run is not valid UTF-8: text
    already handed out cannot follow that change.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer, self.ids = tokenizer, []
        self.start = self.read = 0  # window: ids[start:read] is decoded and emitted; ids[read:] is not yet

    def push(self, token: int) -> str:
        self.ids.append(int(token))
        return self._advance(final=False)

    def flush(self) -> str:
        """The held-back rest (an incomplete character decodes to U+FFFD, as the full decode has it)."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        before = self.tokenizer.decode(self.ids[self.start:self.read])
        after = self.tokenizer.decode(self.ids[self.start:])
        if len(after) <= len(before) or (after.endswith("\ufffd") and not final):
            return ""
        self.start, self.read = self.read, len(self.ids)
        return after[len(before):]
