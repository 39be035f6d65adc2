"""The registry of token-level gates: ``MixtureSpec.gate`` (a name) -> the router's ``Gate``.

A ``Gate`` (``routers.tokenwise``) declares one formula: which stored vectors it reads, whether
inputs and keys are standardised, whether scores are |x·v|, whether a per-query α·global term is
added, its default top-k. ``composer.molora`` reads those fields, in its PyTorch path and in the
arguments of its CPU kernel, and never compares gate names.

The registry fills itself from the token-level routers: every class in ``routers.TOKEN_ROUTERS``
and, on the first name not found there, every plugin router (``moerge.routers`` entry points)
that declares a ``gate``. So a new token-level router is its own file declaring
``gate = Gate(...)`` plus its line in ``TOKEN_ROUTERS`` (or its entry point); nothing here or in
``composer.molora`` changes. ``register_gate`` adds a gate that no router class declares.
"""

from __future__ import annotations

from collections.abc import Iterable

from composer.base import ComposeError
from routers import TOKEN_ROUTERS, plugin_routers
from routers.tokenwise import Gate


class UnknownGate(ComposeError):
    """A mixture names a gate (or a routing-vector kind) that no token-level router registered."""


GATES: dict[str, Gate] = {}
_plugins_read = False


def register_gate(gate: Gate) -> Gate:
    """Make ``gate`` the one ``MixtureSpec.gate == gate.name`` selects; the same gate again is a
    no-op, another one under a taken name is refused."""
    if not isinstance(gate, Gate):
        raise ComposeError(f"register_gate needs a routers.tokenwise.Gate, not {gate!r}")
    known = GATES.get(gate.name)
    if known is not None and known != gate:
        raise ComposeError(f"gate {gate.name!r} is registered already, as {known!r}")
    GATES[gate.name] = gate
    return gate


def _register_routers(routers: Iterable[type]) -> None:
    for router_cls in routers:
        gate = getattr(router_cls, "gate", None)
        if isinstance(gate, Gate):
            register_gate(gate)


def _read_plugins() -> None:
    """The gates of plugin routers, read once, when a name is not among the built-ins'."""
    global _plugins_read
    if not _plugins_read:
        _plugins_read = True
        _register_routers(plugin_routers().values())


def get_gate(name: str) -> Gate:
    """The registered gate called ``name``; an unknown name is refused with the valid ones."""
    if name not in GATES:
        _read_plugins()
    gate = GATES.get(name)
    if gate is None:
        raise UnknownGate(f"unknown gate {name!r}; registered gates: {', '.join(sorted(GATES))}")
    return gate


def check_vector_kind(kind: str) -> None:
    """Refuse routing vectors of a kind that no registered gate reads."""
    if kind not in vector_kinds():
        _read_plugins()
        kinds = vector_kinds()
        if kind not in kinds:
            raise UnknownGate(f"unknown routing-vector kind {kind!r}; registered gates read {', '.join(sorted(kinds))}")


def vector_kinds() -> set[str]:
    """Every routing-vector kind some registered gate reads."""
    return {kind for gate in GATES.values() for kind in gate.vectors}


_register_routers(TOKEN_ROUTERS.values())
