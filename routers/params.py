"""Parameters a router or composer declares, so that a strategy defined as data can be checked.

Each routing method and composer lists its user-settable parameters as ``PARAMS`` (as mergekit's
merge methods declare ``parameters()``): a strategy's ``router_params`` / ``composer_params`` are
checked and coerced against them before anything is stored, and ``moerge strategies show``
prints them. What a method needs from its host (an embedder, validation results, the gold task)
is not a parameter: the runtime supplies it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from registry.errors import DefinitionError

_TYPES = {"int": int, "float": float, "str": str, "bool": bool}
_TRUE, _FALSE = {"true", "1", "yes", "on"}, {"false", "0", "no", "off"}


@dataclass(frozen=True)
class Param:
    name: str
    type: str  # int | float | str | bool
    default: Any
    help: str
    choices: tuple = ()
    minimum: float | None = None
    maximum: float | None = None
    # changes what the router fits and stores per expert (or its head): a strategy that sets it
    # keeps its artifacts apart from the method's defaults (``artifact_key``)
    fit: bool = False

    def coerce(self, owner: str, value: Any) -> Any:
        """``value`` (JSON, YAML, or a CLI string) as this parameter's type, or a clear error."""
        want = _TYPES[self.type]
        if isinstance(value, str) and self.type != "str":
            value = _from_text(value, self.type)
        if self.type == "float" and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if value is None and self.default is None:
            return None
        of_type = isinstance(value, want)  # kept apart: narrowing ``value`` to ``object`` hides its type
        if not of_type or (self.type != "bool" and isinstance(value, bool)):
            raise DefinitionError(f"{owner}: parameter {self.name!r} takes {self.type}, not {value!r}")
        if self.choices and value not in self.choices:
            raise DefinitionError(
                f"{owner}: parameter {self.name!r} is one of {', '.join(map(str, self.choices))}, not {value!r}"
            )
        if self.minimum is not None and value < self.minimum:
            raise DefinitionError(f"{owner}: parameter {self.name!r} must be ≥ {self.minimum}, not {value!r}")
        if self.maximum is not None and value > self.maximum:
            raise DefinitionError(f"{owner}: parameter {self.name!r} must be ≤ {self.maximum}, not {value!r}")
        return value

    def describe(self) -> dict:
        out = {"name": self.name, "type": self.type, "default": self.default, "help": self.help}
        if self.choices:
            out["choices"] = list(self.choices)
        if self.minimum is not None:
            out["minimum"] = self.minimum
        if self.maximum is not None:
            out["maximum"] = self.maximum
        if self.fit:
            out["fit"] = True
        return out


def _from_text(text: str, kind: str) -> Any:
    if kind == "bool":
        low = text.strip().lower()
        return True if low in _TRUE else False if low in _FALSE else text
    try:
        return _TYPES[kind](text)
    except ValueError:
        return text  # reported by ``coerce`` with the parameter's name


def check_params(owner: str, declared: Sequence[Param], given: Mapping[str, Any] | None) -> dict[str, Any]:
    """``given`` checked against ``declared`` and coerced; an unknown name is refused with the
    valid ones."""
    by_name = {p.name: p for p in declared}
    out = {}
    for name, value in (given or {}).items():
        if name not in by_name:
            valid = ", ".join(by_name) or "none"
            raise DefinitionError(f"{owner}: unknown parameter {name!r} (its parameters: {valid})")
        out[name] = by_name[name].coerce(owner, value)
    return out


def artifact_key(method: str, declared: Sequence[Param], params: Mapping[str, Any]) -> str:
    """The name a method's artifacts are stored under: the method's own, unless ``params`` set a
    fitting parameter away from its default (then each such setting is part of the name)."""
    fit = {p.name: params[p.name] for p in declared if p.fit and p.name in params and params[p.name] != p.default}
    # ``method.key-value``: a name the registry accepts (letters, digits, '.', '_', '-')
    return method + "".join(re.sub(r"[^A-Za-z0-9._-]", "_", f".{k}-{v}") for k, v in sorted(fit.items()))
