"""Put a built zoo into the registry: its base model, every expert and their examples.

The base is recorded as ``<base name>-<size>`` (``zoo-base-small``) so that a micro and a small zoo
can live in one registry. Experts keep their names; registering a zoo again adds a new version of
each expert, as any re-registration does.
"""

from __future__ import annotations

from collections.abc import Callable

from registry.errors import NotFoundError, RegistrationError
from registry.models import Expert
from registry.service import Registry
from services.zoo.build import ExpertEntry, ZooManifest, read_examples
from services.zoo.skills import SKILLS


def zoo_base_name(manifest: ZooManifest) -> str:
    return f"{manifest.base.name}-{manifest.size}"


def registered_skills(entry: ExpertEntry) -> list[str]:
    """What an expert declares at registration: the skills it was trained on, and for a one-skill
    adapter that skill's keywords too (Symbolic-MoE builds its task keywords from these). The
    manifest keeps only the trained skills, which the build's floors check against."""
    if entry.kind != "adapter":
        return list(entry.skills)
    return list(dict.fromkeys([*entry.skills, *(tag for s in entry.skills for tag in SKILLS[s].tags)]))


def register_zoo(
    manifest: ZooManifest,
    registry: Registry,
    on_expert: Callable[[str], None] = lambda name: None,
) -> list[Expert]:
    base_name = zoo_base_name(manifest)
    base_path = manifest.path_of(manifest.base.path).resolve()
    try:
        existing = registry.get_base(base_name)
    except NotFoundError:
        registry.register_base(base_name, base_path)
    else:
        if existing.uri != str(base_path):
            raise RegistrationError(
                f"base model {base_name!r} is already registered from {existing.uri}, not {base_path}; "
                "remove its experts and use another MOERGE_HOME, or register this zoo's base under another name"
            )

    registered = []
    for entry in manifest.experts:
        examples = [
            ex.to_json()
            for rel in (entry.train_examples, entry.validation_examples)
            for ex in read_examples(manifest.path_of(rel))
        ]
        registered.append(
            registry.register_expert(
                name=entry.name,
                kind=entry.kind,
                source=manifest.path_of(entry.path),
                base=base_name,
                domains=entry.domains,
                skills=registered_skills(entry),
                description=entry.description,
                examples=examples,
            )
        )
        on_expert(entry.name)
    return registered
