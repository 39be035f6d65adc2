"""API keys for the gateway (the ``api_keys`` rows): generated here, shown once, stored only as a hash.

Keys are 256-bit random tokens, so a plain sha256 is enough to store them (the slow password
hashes exist for guessable secrets); it also lets the gateway find a key by its hash in one
indexed lookup per request.
"""

from __future__ import annotations

import hashlib
import secrets
from datetime import datetime, timezone

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from registry.db import SessionScope
from registry.errors import MoergeError, NotFoundError
from registry.models import KEY_SCOPES, ApiKey
from registry.validation import check_name

KEY_PREFIX = "mk-"


def generate_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(plaintext: str) -> str:
    return hashlib.sha256(plaintext.encode("utf-8")).hexdigest()


def create_key(
    session: Session,
    name: str,
    scope: str = "user",
    models: list[str] | tuple[str, ...] = (),
    rpm: int | None = None,
) -> tuple[ApiKey, str]:
    """Create a key; returns the record and the plaintext key (the only time it exists)."""
    check_name(name, "key name")
    if scope not in KEY_SCOPES:
        raise MoergeError(f"key scope must be one of {', '.join(KEY_SCOPES)}, not {scope!r}")
    if rpm is not None and rpm <= 0:
        raise MoergeError(f"rpm limit must be a positive integer, not {rpm}")
    if session.scalar(select(ApiKey.id).where(ApiKey.name == name)) is not None:
        raise MoergeError(f"an API key named {name!r} already exists")
    plaintext = generate_key()
    record = ApiKey(
        name=name,
        scope=scope,
        allowed_models=list(dict.fromkeys(models)),
        rpm_limit=rpm,
        key_prefix=plaintext[:10],
        key_hash=hash_key(plaintext),
    )
    session.add(record)
    try:
        session.flush()
    except IntegrityError:
        raise MoergeError(f"an API key named {name!r} already exists") from None
    return record, plaintext


def verify_key(session: Session, plaintext: str) -> ApiKey | None:
    """The active key record for ``plaintext``, or None for an unknown or revoked key."""
    if not plaintext or not plaintext.startswith(KEY_PREFIX):
        return None
    record = session.scalar(select(ApiKey).where(ApiKey.key_hash == hash_key(plaintext)))
    if record is None or not record.active:
        return None
    # the lookup already matched; compare again in constant time for defence in depth
    return record if secrets.compare_digest(record.key_hash, hash_key(plaintext)) else None


def list_keys(session: Session) -> list[ApiKey]:
    return list(session.scalars(select(ApiKey).order_by(ApiKey.name)))


def revoke_key(session: Session, name: str) -> ApiKey:
    record = session.scalar(select(ApiKey).where(ApiKey.name == name))
    if record is None:
        raise NotFoundError(f"no API key named {name!r}")
    if record.revoked_at is None:
        record.revoked_at = datetime.now(timezone.utc)
    return record


class Keys:
    """``Registry.keys``: the functions above, each in a transaction of its own."""

    def __init__(self, session: SessionScope, reading: SessionScope) -> None:
        self._session = session
        self._reading = reading

    def create_key(
        self, name: str, scope: str = "user", models: list[str] | tuple[str, ...] = (), rpm: int | None = None
    ) -> tuple[ApiKey, str]:
        """Returns (record, plaintext key). The plaintext is not stored anywhere: show it once."""
        with self._session() as s:
            return create_key(s, name, scope, models, rpm)

    def verify_key(self, plaintext: str) -> ApiKey | None:
        with self._reading() as s:
            return verify_key(s, plaintext)

    def list_keys(self) -> list[ApiKey]:
        with self._reading() as s:
            return list_keys(s)

    def revoke_key(self, name: str) -> ApiKey:
        with self._session() as s:
            return revoke_key(s, name)
