"""The decoding methods, registered: what the API (`LLM.prepare`), the server (a request's fields) and the CLI (its
flags) know about a method comes from here, so a new method is one module (its function) plus one `register` call
below (docs/design.md#add-method).

A method is registered with
    name          what `method=` / `--method` / the request's "method" take
    function      fn(engine, prompt_tokens, max_new_tokens, *, eos_ids, on_token, **kwargs) -> Generation; keywords it
                  takes beyond its options (the sampling options, head_guess) are passed through from the caller
    needs_heads   whether it runs only with intermediate heads loaded (LLM(heads=...), --heads)
    speculative   whether it guesses tokens and verifies them (its stats count early / accepted / rejected guesses)
    options       its Options: each a name (the keyword, the request field, the flag --name-with-dashes), a type (the
                  flag's), a default, a one-line doc (the flag's help), and a check that returns the value to use or
                  raises a BadOption naming the option
    rows          the rows in flight it needs for its checked option values (the engine must hold them); rows_option
                  names the option that sets them, for the error when they do not fit
    bind          checked option values -> (the function's keyword arguments, the options reported in a Completion);
                  default: both are the values themselves
An option that two methods share (max_pending, say) is one Option object, registered with both.
"""
from __future__ import annotations

import dataclasses
import inspect
from typing import Callable

from ..errors import BadOption
from .driver import generate_adadecode, generate_layerskip, generate_lookup
from .vanilla import generate_vanilla

DEFAULT_GAMMA = 0.75  # adadecode's threshold when neither the call nor the heads file gives one


@dataclasses.dataclass(frozen=True)
class Context:
    """What an option's check may look at: the heads loaded (adadecode.engines.head.Head) and their file's metadata."""

    heads: tuple = ()
    heads_meta: dict = dataclasses.field(default_factory=dict)

    @property
    def layers(self) -> list[int]:
        return [h.layer for h in self.heads]


@dataclasses.dataclass(frozen=True)
class Option:
    name: str
    type: type  # the CLI flag's type
    default: object  # when the caller gives none (None: the check decides, e.g. from the heads file)
    doc: str  # one line, the CLI's help after "method: "
    check: Callable[[object, Context], object]  # -> the value to use; BadOption(param=name) when it is refused
    accepts: object = None  # the server's annotation of the field (None: `type`)

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


def _identity(values: dict, ctx: Context) -> tuple[dict, dict]:
    return dict(values), dict(values)


@dataclasses.dataclass(frozen=True)
class Method:
    name: str
    function: Callable
    doc: str
    needs_heads: bool = False
    speculative: bool = False
    options: tuple[Option, ...] = ()
    rows: Callable[[dict], int] = lambda values: 1
    rows_option: str | Callable[[dict], str] | None = None  # or a function of the values
    bind: Callable[[dict, Context], tuple[dict, dict]] = _identity
    binds: tuple[str, ...] = ()  # keywords of `function` that bind sets: a caller may not pass them itself

    def takes(self, keyword: str) -> bool:
        """Whether `function` takes this keyword argument."""
        return keyword in inspect.signature(self.function).parameters

    def checked(self, given: dict, ctx: Context) -> dict:
        """Its options' values: the given ones (else the defaults) through each option's check, in order."""
        return {o.name: o.check(given.get(o.name, o.default), ctx) for o in self.options}


REGISTRY: dict[str, Method] = {}
# keywords of every method's function that the API sets itself
RESERVED = frozenset({"prompt_tokens", "max_new_tokens", "eos_ids", "on_token", "heads"})


def register(method: Method) -> Method:
    if method.name in REGISTRY:
        raise ValueError(f"decoding method {method.name!r} is registered twice")
    for o in method.options:
        other = options().get(o.name)
        if other is not None and other is not o:
            raise ValueError(f"option {o.name!r} of {method.name} differs from the one of the same name of another "
                             f"method: register one Option with both")
    REGISTRY[method.name] = method
    return method


def names() -> tuple[str, ...]:
    return tuple(REGISTRY)


def get(name: str) -> Method:
    if name not in REGISTRY:
        raise BadOption(f"method must be one of {', '.join(REGISTRY)}; got {name!r}", param="method")
    return REGISTRY[name]


def options() -> dict[str, Option]:
    """Every registered option by name (the CLI's flags and the server's request fields)."""
    return {o.name: o for m in REGISTRY.values() for o in m.options}


def users(option: str) -> list[str]:
    """The methods that take an option."""
    return [m.name for m in REGISTRY.values() if any(o.name == option for o in m.options)]


def reserved() -> frozenset:
    """Keywords a caller may not pass through to a method's function: the API's own, every option (they go through
    their checks), and what the methods' binds set."""
    return RESERVED | set(options()) | {k for m in REGISTRY.values() for k in m.binds}


def rows_needed(values: dict) -> int:
    """The most rows in flight any method needs for these option values (the defaults for those not given)."""
    return max(m.rows({o.name: values.get(o.name, o.default) for o in m.options}) for m in REGISTRY.values())


# ---- the checks ---------------------------------------------------------------------------------------------------
def count(name: str):
    """An integer >= 1."""
    def check(value, ctx: Context) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise BadOption(f"{name} must be an integer >= 1, got {value!r}", param=name)
        return value
    return check


def _gamma(value, ctx: Context):
    if value is None:  # the heads file's per-head gammas, else its gamma, else the default
        value = ctx.heads_meta.get("gammas") or ctx.heads_meta.get("gamma", DEFAULT_GAMMA)
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    if any(isinstance(g, bool) or not isinstance(g, (int, float)) or not 0 <= g <= 1 for g in values):
        raise BadOption(f"gamma must be a number in [0, 1] or one per head; got {value!r}", param="gamma")
    return value


def _head_layer(value, ctx: Context) -> int:
    layers = ctx.layers
    if value is None:
        return max(layers)  # the deepest head: the most accurate drafts
    if value not in layers:
        raise BadOption(f"head_layer {value}: the heads sit at layers {layers}", param="head_layer")
    return layers[layers.index(value)]


# ---- the methods --------------------------------------------------------------------------------------------------
GAMMA = Option("gamma", float, None, "exit when a head's confidence > GAMMA (default: the heads file's, else "
               f"{DEFAULT_GAMMA})", _gamma, accepts=float | list[float])
MAX_PENDING = Option("max_pending", int, 5, "most early tokens awaiting verification", count("max_pending"))
K = Option("k", int, 4, "tokens drafted per verification", count("k"))
HEAD_LAYER = Option("head_layer", int, None, "the layer of the drafting head (default: the deepest head)", _head_layer)

def _flag(name: str):
    """true or false."""
    def check(value, ctx: Context) -> bool:
        if not isinstance(value, bool):
            raise BadOption(f"{name} must be true or false, got {value!r}", param=name)
        return value
    return check


CONTEXT = Option("context", bool, False, "also guess from the context: chains of tokens that followed the latest "
                 "earlier match, verified with the heads' guesses (docs/context.md)", _flag("context"))
MAX_CHAIN = Option("max_chain", int, 8, "the longest chain of guesses from the context", count("max_chain"))


def _adadecode_rows(v: dict) -> int:
    return max(v["max_pending"], v["max_chain"] if v["context"] else 0) + 1


def _adadecode_bind(v: dict, ctx: Context) -> tuple[dict, dict]:
    reported = dict(gamma=v["gamma"], max_pending=v["max_pending"])
    if v["context"]:  # a request without context reports what it always did
        reported.update(context=True, max_chain=v["max_chain"])
    return dict(v), reported


register(Method("vanilla", generate_vanilla, "vanilla greedy decoding (or seeded sampling)"))
register(Method("adadecode", generate_adadecode, "AdaDecode: early exits at confident heads, verified by the last layer",
                needs_heads=True, speculative=True, options=(GAMMA, MAX_PENDING, CONTEXT, MAX_CHAIN),
                rows=_adadecode_rows, bind=_adadecode_bind,
                rows_option=lambda v: "max_chain" if v["context"] and v["max_chain"] > v["max_pending"] else "max_pending"))
register(Method("layerskip", generate_layerskip, "LayerSkip-style drafting from one head, verified by the last layer",
                needs_heads=True, speculative=True, options=(K, HEAD_LAYER), rows=lambda v: v["k"] + 1,
                rows_option="k", binds=("head_index",),
                bind=lambda v, ctx: (dict(head_index=ctx.layers.index(v["head_layer"]), k=v["k"]),
                                     dict(head_layer=v["head_layer"], k=v["k"]))))
register(Method("lookup", generate_lookup, "guesses from the context alone (no heads), verified by the last layer",
                speculative=True, options=(MAX_CHAIN,), rows=lambda v: v["max_chain"] + 1, rows_option="max_chain"))
