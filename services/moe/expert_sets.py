"""Expert sets: the experts a strategy may choose, as names and filters.

An expert set lists expert names and filters ``domain:…``, ``skill:…``, ``base:…``, ``kind:…``
or ``tag:…`` (a domain or a skill). The set is the named experts plus those that match every
filter; an empty set means every expert the strategy's methods can use (``strategy_kinds``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from composer import composer_class
from registry.errors import DefinitionError, RegistrationError
from registry.validation import check_name
from routers import router_class

FILTER_KEYS = ("domain", "skill", "base", "kind", "tag")


@dataclass(frozen=True)
class Candidate:
    """What an expert set is matched on: one registered expert."""

    name: str
    kind: str  # adapter | model | external
    base: str | None
    domains: tuple[str, ...] = ()
    skills: tuple[str, ...] = ()

    @classmethod
    def of(cls, record) -> Candidate:  # a registry Expert
        return cls(
            record.name,
            record.kind,
            record.base.name if record.base is not None and record.kind != "external" else None,
            tuple(record.domains or ()),
            tuple(record.skills or ()),
        )

    def matches(self, key: str, value: str) -> bool:
        if key == "domain":
            return value in self.domains
        if key == "skill":
            return value in self.skills
        if key == "tag":
            return value in self.domains or value in self.skills
        if key == "base":
            return self.base == value
        return self.kind == value  # kind


def split_expert_set(entries: Sequence[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """(names, filters) of an expert set; a malformed entry is refused."""
    names, filters = [], []
    for entry in entries:
        if not isinstance(entry, str) or not entry.strip():
            raise DefinitionError(f"an expert set lists names or filters as strings, not {entry!r}")
        entry = entry.strip()
        if ":" in entry:
            key, _, value = entry.partition(":")
            if key not in FILTER_KEYS or not value:
                raise DefinitionError(
                    f"unknown expert filter {entry!r}: filters are " + ", ".join(f"{k}:<value>" for k in FILTER_KEYS)
                )
            filters.append((key, value))
        else:
            try:
                names.append(check_name(entry))
            except RegistrationError as exc:
                raise DefinitionError(str(exc)) from None
    return names, filters


def select_experts(entries: Sequence[str], candidates: Iterable[Candidate]) -> list[str]:
    """The names an expert set picks among ``candidates`` (every one when the set is empty), in
    the candidates' order."""
    candidates = list(candidates)
    if not entries:
        return [c.name for c in candidates]
    names, filters = split_expert_set(entries)
    chosen = set(names)
    if filters:
        chosen |= {c.name for c in candidates if all(c.matches(k, v) for k, v in filters)}
    return [c.name for c in candidates if c.name in chosen]


def strategy_kinds(strategy) -> tuple[str, ...]:  # a Strategy
    """The expert kinds a strategy can use: those both its router and its composer take."""
    router_cls, composer_cls = router_class(strategy.router), composer_class(strategy.composer)
    if router_cls is None or composer_cls is None:
        raise DefinitionError(f"{strategy.name}: unknown router {strategy.router!r} or composer {strategy.composer!r}")
    return tuple(k for k in router_cls.kinds if k in composer_cls.kinds)
