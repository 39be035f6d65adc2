"""Put a built zoo into the registry: its base model, every expert and their examples.

A domains zoo also stores its held-out documents as the text suite ``domains`` (metric loss), so
that ``moerge leaderboard run --suite domains`` scores every expert and strategy on them.

The base is recorded as ``<base name>-<size>`` (``zoo-base-small``) so that a micro and a small zoo
can live in one registry. Experts keep their names; registering a zoo again adds a new version of
each expert, as any re-registration does.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

from registry.errors import NotFoundError, RegistrationError
from registry.models import Expert
from registry.service import Registry
from services.leaderboard.suites import SuiteImportError, parse_rows
from services.zoo.build import ExpertEntry, ZooManifest, read_examples
from services.zoo.skills import SKILLS

SUITE_DESCRIPTION = "held-out documents of the domains zoo"


def zoo_base_name(manifest: ZooManifest) -> str:
    return f"{manifest.base.name}-{manifest.size}"


def registered_skills(entry: ExpertEntry) -> list[str]:
    """What an expert declares at registration: the skills it was trained on, and for a one-skill
    adapter that skill's keywords too (Symbolic-MoE builds its task keywords from these). The
    manifest keeps only the trained skills, which the build's floors check against."""
    if entry.kind != "adapter":
        return list(entry.skills)
    return list(dict.fromkeys([*entry.skills, *(tag for s in entry.skills for tag in SKILLS[s].tags)]))


TEXT_SUITE = "domains"  # the suite a domains zoo registers: its held-out documents, scored by loss


def text_suite_rows(manifest: ZooManifest) -> tuple[list[dict], str]:
    """A domains zoo's held-out splits as suite rows (validated as ``moerge suite add`` validates
    a file), and the sha256 of their files."""
    rows, digest = [], hashlib.sha256()
    for split, rel in manifest.suite.items():
        path = manifest.path_of(rel)
        digest.update(path.read_bytes())
        try:
            got = parse_rows(path)
        except SuiteImportError as exc:
            raise RegistrationError(
                f"{path}: not a text suite this moerge reads ({exc.errors[0][1]}); rebuild the zoo "
                "(`moerge zoo build --suite domains`)"
            ) from None
        if any(r["split"] != split or r["metric"] != "loss" for r in got):
            raise RegistrationError(f"{path}: expected documents of split {split!r} with metric loss; rebuild the zoo")
        rows.extend(got)
    return rows, digest.hexdigest()


def register_zoo(
    manifest: ZooManifest,
    registry: Registry,
    on_expert: Callable[[str], None] = lambda name: None,
) -> list[Expert]:
    """The base, every expert and, for a domains zoo, its text suite ``domains`` (replacing the
    one an earlier registration of a zoo stored; a user's own suite of that name is refused
    before anything is registered)."""
    suite = None
    if manifest.zoo == "domains":
        rows, checksum = text_suite_rows(manifest)
        source = str(manifest.path_of("examples/suite").resolve())
        try:
            existing_suite = registry.get_suite(TEXT_SUITE)
        except NotFoundError:
            existing_suite = None
        if existing_suite is not None and not existing_suite.description.startswith(SUITE_DESCRIPTION):
            raise RegistrationError(
                f"suite {TEXT_SUITE!r} exists and is not a domains zoo's ({existing_suite.source}); "
                f"remove it first (`moerge suite remove {TEXT_SUITE}`)"
            )
        suite = (rows, checksum, source)
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
    if suite is not None:
        rows, checksum, source = suite
        registry.add_suite(
            TEXT_SUITE,
            rows,
            description=f"{SUITE_DESCRIPTION} ({manifest.size}, seed {manifest.seed})",
            source=source,
            checksum=checksum,
            replace=True,
        )
    return registered
