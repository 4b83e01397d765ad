"""The error every layer raises for a value the caller chose: `BadOption`, a ValueError that names its field.

`param` is the name the caller used (a keyword of `LLM.generate`, a field of the server's request body, an
`EngineOptions` field, or the environment variable a value came from), so the server fills OpenAI's error `param`
from it without reading the message; `code` is OpenAI's error code where one applies (`context_length_exceeded`).
Errors about files (a checkpoint, a head file) are ConfigError / HeadFileError in adadecode.model and heads.
"""
from __future__ import annotations

CONTEXT_LENGTH_EXCEEDED = "context_length_exceeded"


class BadOption(ValueError):
    """A refused value: the message says what is wrong, `param` which field it is, `code` OpenAI's error code."""

    def __init__(self, message: str, *, param: str | None, code: str | None = None):
        super().__init__(message)
        self.param, self.code = param, code
