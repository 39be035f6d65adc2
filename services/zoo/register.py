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
from services.zoo.build import ZooManifest, read_examples


def zoo_base_name(manifest: ZooManifest) -> str:
    return f"{manifest.base.name}-{manifest.size}"


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
                skills=entry.skills,
                description=entry.description,
                examples=examples,
            )
        )
        on_expert(entry.name)
    return registered
