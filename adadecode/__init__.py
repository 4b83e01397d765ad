"""adadecode: exact early-exit greedy decoding (AdaDecode) for Llama models.

    import adadecode
    llm = adadecode.LLM("default", heads="default:code")
    print(llm.generate("Write a haiku about GPUs.", chat=True, max_new_tokens=48).text)

`LLM` (adadecode.api) is the one entry point: generate / stream, with the method (vanilla, adadecode, layerskip)
and its options; `python -m adadecode serve` puts it behind an OpenAI-compatible HTTP server.
"""
from .api import DEFAULT_GAMMA, METHODS, Cancelled, Completion, Delta, LLM
from .model.loader import Model, load_model

__all__ = ["LLM", "Completion", "Delta", "Cancelled", "METHODS", "DEFAULT_GAMMA", "Model", "load_model"]
