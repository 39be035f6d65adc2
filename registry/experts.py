"""Base models and experts (adapter | model | external): registration, versions, lookup, removal.

A registration is validated completely before anything is written. Files are then copied into a
staging folder inside the artifact store; the rows are inserted in one transaction and the staged
folder is moved into place (one rename) before that transaction commits. Any failure rolls the
transaction back and deletes the staged or moved files, so a refused or lost registration leaves
no row and no file. Two registrations of the same name + version race on the unique constraint:
exactly one wins, the other gets ``RegistrationError``.
"""

from __future__ import annotations

import os
from datetime import datetime, timezone
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from registry.artifacts import ArtifactStore
from registry.db import SessionScope
from registry.errors import MoergeError, NotFoundError, RegistrationError
from registry.hub import fetch as hub_fetch
from registry.hub import is_hub_uri, model_folder, parse_hub_uri
from registry.models import EXPERT_KINDS, EXPERT_STATUSES, BaseModel, Expert, ExpertExample
from registry.validation import (
    Limits,
    SourceFile,
    check_base_name,
    check_connection,
    check_external,
    check_labels,
    check_name,
    check_version,
    inspect_base,
    load_examples,
    scan_source,
    validate_adapter,
    validate_model,
)

AUTO_VERSION_RETRIES = 5


class _VersionTaken(Exception):
    """Another registration took this name + version after our first check."""


class Experts:
    """The ``base_models``, ``experts`` and ``expert_examples`` rows, and the experts' files."""

    def __init__(self, session: SessionScope, reading: SessionScope, store: ArtifactStore, limits: Limits) -> None:
        self._session = session
        self._reading = reading
        self.store = store
        self.limits = limits

    # --- base models -----------------------------------------------------------------------------

    def register_base(self, name: str, path: str | os.PathLike, trust_remote_code: bool = False) -> BaseModel:
        """Record a base model folder (config.json, safetensors, a tokenizer). Its files are not
        copied. ``name`` may be a hub id (``Qwen/Qwen2.5-7B-Instruct``). A base that brings its own
        code is refused unless ``trust_remote_code`` (then every engine loading it runs that code).

        ``path`` may be a hub reference, ``hf://owner/name[@revision]`` (registry/hub.py): it is
        fetched into the Hugging Face cache, checked as a folder is, and recorded pinned to its
        commit; engines load it from the cache (downloading it where they do not have it)."""
        check_base_name(name)
        if is_hub_uri(path):
            folder, ref = hub_fetch(parse_hub_uri(str(path)), RegistrationError)
            uri = ref.uri
        else:
            folder = Path(path).expanduser().resolve()
            uri = str(folder)
        info = inspect_base(folder, trust_remote_code=trust_remote_code)
        with self._session() as s:
            if s.scalar(select(BaseModel.id).where(BaseModel.name == name)) is not None:
                raise RegistrationError(f"base model {name!r} is already registered")
            base = BaseModel(
                name=name,
                uri=uri,
                architecture=info.architecture,
                checksum=info.fingerprint,
                trust_remote_code=bool(trust_remote_code and info.remote_code),
            )
            s.add(base)
            try:
                s.flush()
            except IntegrityError:
                raise RegistrationError(f"base model {name!r} is already registered") from None
        return base

    def remove_base(self, name: str, cascade: bool = False) -> tuple[BaseModel, list[Expert]]:
        """Remove a base model's record (its folder stays: it was never copied). Refused while
        experts are built on it, unless ``cascade``, which removes those experts first, every
        version, with their files. Returns the base and the experts removed."""
        with self._reading() as s:
            base = s.scalar(select(BaseModel).where(BaseModel.name == name))
            if base is None:
                raise NotFoundError(f"no base model named {name!r}")
            users = sorted({e.name for e in s.scalars(select(Expert).where(Expert.base_model_id == base.id))})
        if users and not cascade:
            raise RegistrationError(
                f"base model {name!r} is used by {len(users)} expert(s) ({', '.join(users)}); remove them "
                "first, or remove the base with --cascade to remove them too"
            )
        removed = [e for user in users for e in self.remove_expert(user)]
        with self._session() as s:
            row = s.scalar(select(BaseModel).where(BaseModel.name == name))
            if row is None:
                raise NotFoundError(f"no base model named {name!r}")
            if s.scalar(select(Expert.id).where(Expert.base_model_id == row.id)) is not None:
                raise RegistrationError(f"base model {name!r} got a new expert while it was being removed; try again")
            s.delete(row)
        return base, removed

    def get_base(self, name: str) -> BaseModel:
        with self._reading() as s:
            base = s.scalar(select(BaseModel).where(BaseModel.name == name))
        if base is None:
            raise NotFoundError(f"no base model named {name!r} (register it with `moerge base add`)")
        return base

    def list_bases(self) -> list[BaseModel]:
        with self._reading() as s:
            return list(s.scalars(select(BaseModel).order_by(BaseModel.name)))

    # --- experts ---------------------------------------------------------------------------------

    def register_expert(
        self,
        name: str,
        kind: str,
        source: str | os.PathLike,
        base: str | None = None,
        version: str | None = None,
        domains: tuple[str, ...] | list[str] = (),
        skills: tuple[str, ...] | list[str] = (),
        description: str = "",
        examples: str | os.PathLike | list[dict] | None = None,
        cost: float | None = None,
        status: str = "ready",
        api_base: str | None = None,
        api_key_env: str | None = None,
    ) -> Expert:
        """Validate, store and record an expert; returns its record.

        ``source``: a peft LoRA folder (adapter), a Hugging Face model folder (model) or a litellm
        model string such as ``openai/gpt-4o-mini`` (external). ``version`` defaults to the next
        integer for ``name``. ``status`` is ``ready`` unless the caller still has to fit routing
        artifacts (then ``pending``, and ``set_status`` once they are stored). ``api_base`` and
        ``api_key_env`` (external experts only): the server to call, and the name of the
        environment variable that holds the key on the machines that call it.
        """
        # 1. validate everything; nothing is written yet
        check_name(name)
        if kind not in EXPERT_KINDS:
            raise RegistrationError(f"expert kind must be one of {', '.join(EXPERT_KINDS)}, not {kind!r}")
        if version is not None:
            check_version(str(version))
            version = str(version)
        if status not in EXPERT_STATUSES:
            raise RegistrationError(f"status must be one of {', '.join(EXPERT_STATUSES)}, not {status!r}")
        if cost is not None and (not isinstance(cost, (int, float)) or cost < 0 or cost != cost):
            raise RegistrationError(f"cost per 1k tokens must be a number >= 0, not {cost!r}")
        if not isinstance(description, str) or len(description) > 10_000:
            raise RegistrationError("description must be a string of at most 10000 characters")
        domain_list = check_labels(domains, "domain")
        skill_list = check_labels(skills, "skill")
        rows = load_examples(examples, self.limits)

        base_row = self.get_base(base) if base is not None else None
        if kind == "adapter" and base_row is None:
            raise RegistrationError("an adapter expert needs --base: the registered base model it was trained on")
        if kind == "external" and base_row is not None:
            raise RegistrationError("an external expert has no base model")
        if kind != "external" and (api_base or api_key_env):
            raise RegistrationError("api_base and api_key_env are for external experts only")
        check_connection(api_base, api_key_env)

        if kind == "external":
            files: list[SourceFile] = []
            uri, source_label = check_external(str(source)), str(source)
        else:
            hub_label = None  # a hub reference is fetched into the HF cache, then stored as a folder is
            if is_hub_uri(source):
                source, pinned = hub_fetch(parse_hub_uri(str(source)), RegistrationError)
                hub_label = pinned.uri
            root, files = scan_source(source, self.limits)
            source_label = hub_label or str(root)
            if kind == "adapter":
                assert base_row is not None
                validate_adapter(root, files, base_row.name, str(model_folder(base_row.uri)))
            else:
                validate_model(root, files)

        if version is not None:
            with self._session() as s:
                if self._find(s, name, version) is not None:
                    raise RegistrationError(f"expert {name} version {version} already exists")

        # 2. stage files, 3. insert rows and move files in, in one transaction
        staged = self.store.stage() if files else None
        try:
            checksum, size = self.store.copy_in(files, staged) if staged else ("", 0)
            for attempt in range(AUTO_VERSION_RETRIES):
                try:
                    return self._insert(
                        staged=staged,
                        name=name,
                        kind=kind,
                        version=version,
                        base_row=base_row,
                        uri=uri if kind == "external" else None,
                        source=source_label,
                        domains=domain_list,
                        skills=skill_list,
                        description=description,
                        rows=rows,
                        cost=None if cost is None else float(cost),
                        api_base=api_base,
                        api_key_env=api_key_env,
                        status=status,
                        checksum=checksum,
                        size=size,
                    )
                except (IntegrityError, _VersionTaken):
                    # an automatic version raced another registration of this name: take the next one
                    if version is None and attempt + 1 < AUTO_VERSION_RETRIES:
                        continue
                    raise RegistrationError(
                        f"expert {name} version {version or '(next)'} already exists (registered concurrently)"
                    ) from None
            raise AssertionError("unreachable")
        except MoergeError:
            raise
        except Exception as exc:
            raise RegistrationError(f"registering {name} failed, nothing was kept: {exc}") from exc
        finally:
            if staged is not None and staged.exists():
                self.store.discard(staged)

    def _insert(
        self, *, staged: Path | None, name: str, version: str | None, base_row: BaseModel | None, rows: list, **fields
    ) -> Expert:
        published: Path | None = None
        try:
            with self._session() as s:
                v = version or self._next_version(s, name)
                if self._find(s, name, v) is not None:  # committed meanwhile; a racing one fails on flush
                    raise _VersionTaken(v)
                rel = ArtifactStore.expert_rel(name, v) if staged is not None else None
                expert = Expert(
                    name=name,
                    version=v,
                    kind=fields["kind"],
                    base=s.get(BaseModel, base_row.id) if base_row is not None else None,
                    uri=fields["uri"] or str(self.store.resolve(rel or "")),  # rel: files kept here
                    store_path=rel,
                    source=fields["source"],
                    domains=fields["domains"],
                    skills=fields["skills"],
                    description=fields["description"],
                    status=fields["status"],
                    checksum=fields["checksum"],
                    size_bytes=fields["size"],
                    cost_per_1k_tokens=fields["cost"],
                    api_base=fields.get("api_base"),
                    api_key_env=fields.get("api_key_env"),
                )
                expert.examples = [
                    ExpertExample(prompt=r.prompt, reference=r.reference, task=r.task, split=r.split) for r in rows
                ]
                s.add(expert)
                s.flush()  # the unique (name, version) check happens here; the loser stops
                if staged is not None and rel is not None:  # rel is set whenever files were staged
                    published = self.store.publish(staged, rel)
            return expert
        except BaseException:
            self.store.discard(published)
            raise

    @staticmethod
    def _find(s: Session, name: str, version: str) -> Expert | None:
        return s.scalar(select(Expert).where(Expert.name == name, Expert.version == version))

    @staticmethod
    def _next_version(s: Session, name: str) -> str:
        versions = s.scalars(select(Expert.version).where(Expert.name == name))
        numbers = [int(v) for v in versions if v.isdigit()]
        return str(max(numbers, default=0) + 1)

    def list_experts(self, kind: str | None = None, status: str | None = None) -> list[Expert]:
        with self._reading() as s:
            q = select(Expert)
            if kind is not None:
                q = q.where(Expert.kind == kind)
            if status is not None:
                q = q.where(Expert.status == status)
            return list(s.scalars(q.order_by(Expert.name, Expert.id)))

    def get_expert(self, name: str, version: str | None = None) -> Expert:
        """An expert by name: the given version, or the most recently registered one."""
        with self._reading() as s:
            q = select(Expert).where(Expert.name == name)
            if version is not None:
                q = q.where(Expert.version == str(version))
            expert = s.scalars(q.order_by(Expert.id.desc()).limit(1)).first()
        if expert is None:
            what = f"{name} version {version}" if version is not None else name
            raise NotFoundError(f"no expert {what}")
        return expert

    def get_examples(self, name: str, version: str | None = None, split: str | None = None) -> list[ExpertExample]:
        expert = self.get_expert(name, version)
        with self._reading() as s:
            q = select(ExpertExample).where(ExpertExample.expert_id == expert.id)
            if split is not None:
                q = q.where(ExpertExample.split == split)
            return list(s.scalars(q.order_by(ExpertExample.id)))

    def expert_path(self, expert: Expert) -> Path | None:
        """The folder holding an adapter's or model's files (None for external experts)."""
        return self.store.resolve(expert.store_path) if expert.store_path else None

    def set_status(self, name: str, version: str, status: str) -> Expert:
        if status not in EXPERT_STATUSES:
            raise MoergeError(f"status must be one of {', '.join(EXPERT_STATUSES)}, not {status!r}")
        with self._session() as s:
            expert = self._find(s, name, str(version))
            if expert is None:
                raise NotFoundError(f"no expert {name} version {version}")
            expert.status = status
            expert.updated_at = datetime.now(timezone.utc)
        return expert

    def remove_expert(self, name: str, version: str | None = None) -> list[Expert]:
        """Remove one version (or, without ``version``, every version) with its files and artifacts."""
        moved: list[tuple[Path, str]] = []
        try:
            with self._session() as s:
                q = select(Expert).where(Expert.name == name)
                if version is not None:
                    q = q.where(Expert.version == str(version))
                experts = list(s.scalars(q.order_by(Expert.id)))
                if not experts:
                    what = f"{name} version {version}" if version is not None else name
                    raise NotFoundError(f"no expert {what}")
                rels = [a.path for e in experts for a in e.artifacts] + [e.store_path for e in experts if e.store_path]
                for e in experts:
                    s.delete(e)
                s.flush()
                for rel in rels:  # moved aside now, deleted once the delete commits
                    aside = self.store.trash(rel)
                    if aside is not None:
                        moved.append((aside, rel))
        except BaseException:
            for aside, rel in reversed(moved):
                self.store.restore(aside, rel)
            raise
        for aside, _ in moved:
            self.store.discard(aside)
        return experts
