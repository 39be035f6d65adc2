"""The registry's tables as typed SQLAlchemy 2 models.

Migrations (``registry/migrations``) own the schema; these classes describe it for the ORM and
for Alembic's autogenerate. A change here needs a new migration revision.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Literal

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    false,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator

ExpertKind = Literal["adapter", "model", "external"]
ExpertStatus = Literal["pending", "ready", "failed"]
KeyScope = Literal["admin", "user"]

EXPERT_KINDS: tuple[str, ...] = ("adapter", "model", "external")
EXPERT_STATUSES: tuple[str, ...] = ("pending", "ready", "failed")
KEY_SCOPES: tuple[str, ...] = ("admin", "user")
EXAMPLE_SPLITS: tuple[str, ...] = ("train", "validation", "test")

# Named constraints, so later migrations can alter them by name on Postgres and in SQLite batches.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC datetime on every backend (SQLite stores it without a zone)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect) -> datetime | None:  # noqa: ANN001
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc) if value is not None else None

    def process_result_value(self, value: datetime | None, dialect) -> datetime | None:  # noqa: ANN001
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=timezone.utc)
        return value


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {datetime: UTCDateTime}


class BaseModel(Base):
    """A base model that adapters are trained on. Its files stay where they are (bases are large)."""

    __tablename__ = "base_models"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    uri: Mapped[str] = mapped_column(String(1024))  # local folder with config.json + safetensors
    architecture: Mapped[str] = mapped_column(String(128), default="")
    checksum: Mapped[str] = mapped_column(String(64), default="")
    # the folder's own code (auto_map, .py files) may run: an explicit opt-in at registration
    trust_remote_code: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    def __repr__(self) -> str:
        return f"BaseModel(name={self.name!r}, uri={self.uri!r})"


class Expert(Base):
    __tablename__ = "experts"
    __table_args__ = (UniqueConstraint("name", "version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(128), index=True)
    version: Mapped[str] = mapped_column(String(64))
    kind: Mapped[str] = mapped_column(String(16))  # ExpertKind
    base_model_id: Mapped[int | None] = mapped_column(ForeignKey("base_models.id", ondelete="RESTRICT"))
    # adapter / model: absolute folder in the artifact store; external: litellm "provider/model"
    uri: Mapped[str] = mapped_column(String(1024))
    # adapter / model: folder relative to the artifact root (what survives moving the store)
    store_path: Mapped[str | None] = mapped_column(String(1024))
    source: Mapped[str] = mapped_column(String(1024), default="")  # where it was registered from
    domains: Mapped[list[str]] = mapped_column(JSON, default=list)
    skills: Mapped[list[str]] = mapped_column(JSON, default=list)
    description: Mapped[str] = mapped_column(Text, default="")
    status: Mapped[str] = mapped_column(String(16), default="pending")  # ExpertStatus
    checksum: Mapped[str] = mapped_column(String(64), default="")  # sha256 over the stored files
    size_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    cost_per_1k_tokens: Mapped[float | None] = mapped_column(Float)
    # external experts: the server to call (None: the provider's own) and the NAME of the
    # environment variable holding its key (None: litellm's provider default); never the key itself
    api_base: Mapped[str | None] = mapped_column(String(1024))
    api_key_env: Mapped[str | None] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)

    # Loaded with the expert so records stay usable after their session closes.
    base: Mapped[BaseModel | None] = relationship(lazy="joined")
    examples: Mapped[list[ExpertExample]] = relationship(
        back_populates="expert", cascade="all, delete-orphan", passive_deletes=True, lazy="select"
    )
    artifacts: Mapped[list[Artifact]] = relationship(
        back_populates="expert", cascade="all, delete-orphan", passive_deletes=True, lazy="select"
    )

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    def __repr__(self) -> str:
        return f"Expert(name={self.name!r}, version={self.version!r}, kind={self.kind!r}, status={self.status!r})"


class ExpertExample(Base):
    """An example prompt of what the expert is good at (routers fit on the train split)."""

    __tablename__ = "expert_examples"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    expert_id: Mapped[int] = mapped_column(ForeignKey("experts.id", ondelete="CASCADE"), index=True)
    prompt: Mapped[str] = mapped_column(Text)
    reference: Mapped[str] = mapped_column(Text, default="")
    task: Mapped[str] = mapped_column(String(128), default="")
    split: Mapped[str] = mapped_column(String(32), default="train")

    expert: Mapped[Expert] = relationship(back_populates="examples")


class Artifact(Base):
    """A file (or folder) in the artifact store that a router fitted, per expert and router.

    ``expert_id`` is NULL for a router's own artifacts that belong to no single expert
    (a classifier head over all experts, say).
    """

    __tablename__ = "artifacts"
    __table_args__ = (UniqueConstraint("router", "expert_id", "kind"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    expert_id: Mapped[int | None] = mapped_column(ForeignKey("experts.id", ondelete="CASCADE"), index=True)
    router: Mapped[str] = mapped_column(String(128), index=True)
    kind: Mapped[str] = mapped_column(String(64))
    path: Mapped[str] = mapped_column(String(1024))  # relative to the artifact root
    checksum: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    expert: Mapped[Expert | None] = relationship(back_populates="artifacts", lazy="joined")

    def __repr__(self) -> str:
        return f"Artifact(router={self.router!r}, kind={self.kind!r}, path={self.path!r})"


class ApiKey(Base):
    """An API key for the gateway. Only a hash of the key is stored; the key is shown once."""

    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    scope: Mapped[str] = mapped_column(String(16), default="user")  # KeyScope
    allowed_models: Mapped[list[str]] = mapped_column(JSON, default=list)  # empty: every model
    rpm_limit: Mapped[int | None] = mapped_column(Integer)  # requests per minute; None: unlimited
    key_prefix: Mapped[str] = mapped_column(String(16))  # first characters, to tell keys apart
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    @property
    def active(self) -> bool:
        return self.revoked_at is None

    def allows(self, model: str) -> bool:
        return self.scope == "admin" or not self.allowed_models or model in self.allowed_models

    def __repr__(self) -> str:
        return f"ApiKey(name={self.name!r}, scope={self.scope!r}, prefix={self.key_prefix!r})"


# --- strategies users define (migration 0005) ----------------------------------------------------


class StrategyRecord(Base):
    """A strategy a user defined (``moerge strategies add``, ``POST /v1/strategies``): a router and
    a composer with their parameters over an expert set. Built-in strategies are code, not rows.
    The definition was checked against the declared parameters before it was stored."""

    __tablename__ = "strategies"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)  # served as moe/<name>
    router: Mapped[str] = mapped_column(String(128))
    composer: Mapped[str] = mapped_column(String(128))
    router_params: Mapped[dict] = mapped_column(JSON, default=dict)
    composer_params: Mapped[dict] = mapped_column(JSON, default=dict)
    # expert names, and filters (domain:…, skill:…, base:…, kind:…, tag:…); empty: every expert
    experts: Mapped[list[str]] = mapped_column(JSON, default=list)
    fallback: Mapped[str | None] = mapped_column(String(128))
    description: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)

    def __repr__(self) -> str:
        return f"StrategyRecord(name={self.name!r}, router={self.router!r}, composer={self.composer!r})"


# --- leaderboard: user suites and stored runs (migration 0002) ------------------------------------

SUITE_METRICS: tuple[str, ...] = ("exact_match", "contains", "multiple_choice", "loss")
# bound: a row computed from the experts' rows, not run (the per-segment oracle of a text suite)
LEADERBOARD_ENTRY_KINDS: tuple[str, ...] = ("expert", "strategy", "bound")


class Suite(Base):
    """A user benchmark suite imported from JSONL (``moerge suite add``). Built-in suites (the
    zoo's ``skills``) are generated in code and have no row."""

    __tablename__ = "suites"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    description: Mapped[str] = mapped_column(Text, default="")
    source: Mapped[str] = mapped_column(String(1024), default="")  # the file it was imported from
    checksum: Mapped[str] = mapped_column(String(64), default="")  # sha256 of that file
    n_examples: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    examples: Mapped[list[SuiteExample]] = relationship(
        back_populates="suite",
        cascade="all, delete-orphan",
        passive_deletes=True,
        lazy="select",
        order_by="SuiteExample.id",
    )

    def __repr__(self) -> str:
        return f"Suite(name={self.name!r}, n_examples={self.n_examples})"


class SuiteExample(Base):
    """One query of a suite: its prompt, the reference answer, the gold task, split and metric."""

    __tablename__ = "suite_examples"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    suite_id: Mapped[int] = mapped_column(ForeignKey("suites.id", ondelete="CASCADE"), index=True)
    line: Mapped[int] = mapped_column(Integer)  # line number in the imported file
    prompt: Mapped[str] = mapped_column(Text)
    reference: Mapped[str] = mapped_column(Text)
    task: Mapped[str] = mapped_column(String(128), default="")
    split: Mapped[str] = mapped_column(String(32))
    metric: Mapped[str] = mapped_column(String(32), default="exact_match")  # SUITE_METRICS
    choices: Mapped[list[str] | None] = mapped_column(JSON)  # multiple_choice only
    segments: Mapped[list[list[str]] | None] = mapped_column(JSON)  # loss only: [[label, text], ...]

    suite: Mapped[Suite] = relationship(back_populates="examples")


class LeaderboardRun(Base):
    """One ``moerge leaderboard run``: what was measured, how, and when."""

    __tablename__ = "leaderboard_runs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    suite: Mapped[str] = mapped_column(String(128), index=True)
    base_model: Mapped[str] = mapped_column(String(128), default="")
    seed: Mapped[int] = mapped_column(Integer, default=0)
    n_per_task: Mapped[int | None] = mapped_column(Integer)  # None: the suite's default sizes
    splits: Mapped[list[str]] = mapped_column(JSON, default=list)
    mode: Mapped[str] = mapped_column(String(16), default="grouped")  # grouped | naive
    n_queries: Mapped[int] = mapped_column(Integer, default=0)
    seconds: Mapped[float] = mapped_column(Float, default=0.0)
    settings: Mapped[dict] = mapped_column(JSON, default=dict)  # default cost, versions, machine …
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    results: Mapped[list[LeaderboardResult]] = relationship(
        back_populates="run",
        cascade="all, delete-orphan",
        passive_deletes=True,
        lazy="select",
        order_by="LeaderboardResult.id",
    )

    def __repr__(self) -> str:
        return f"LeaderboardRun(id={self.id}, suite={self.suite!r}, seed={self.seed})"


class LeaderboardResult(Base):
    """One entry (an expert alone or a strategy) on one split of a run. Totals are stored (tokens,
    cost, correct answers) so that views can pool splits exactly."""

    __tablename__ = "leaderboard_results"
    __table_args__ = (UniqueConstraint("run_id", "entry", "split"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("leaderboard_runs.id", ondelete="CASCADE"), index=True)
    entry: Mapped[str] = mapped_column(String(256))  # "moe/…" or "expert:<name>"
    kind: Mapped[str] = mapped_column(String(16))  # LEADERBOARD_ENTRY_KINDS
    split: Mapped[str] = mapped_column(String(32))
    n: Mapped[int] = mapped_column(Integer)  # queries scored
    correct: Mapped[int] = mapped_column(Integer)
    accuracy: Mapped[float] = mapped_column(Float)
    skipped: Mapped[int] = mapped_column(Integer, default=0)  # queries this entry cannot answer
    routed: Mapped[int] = mapped_column(Integer, default=0)  # queries whose routing could be judged
    routing_accuracy: Mapped[float | None] = mapped_column(Float)
    mean_experts: Mapped[float] = mapped_column(Float, default=0.0)
    prompt_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    completion_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    cost: Mapped[float] = mapped_column(Float, default=0.0)  # total over the split's queries
    latency_p50_ms: Mapped[float] = mapped_column(Float, default=0.0)
    latency_p95_ms: Mapped[float] = mapped_column(Float, default=0.0)
    seconds: Mapped[float] = mapped_column(Float, default=0.0)
    per_task: Mapped[dict] = mapped_column(JSON, default=dict)  # task -> [correct, n]
    confusion: Mapped[dict] = mapped_column(JSON, default=dict)  # gold task -> chosen expert -> count
    # text suites (metric loss): {"documents": n, "labels": {label: [nats, tokens]}}; None: none
    loss: Mapped[dict | None] = mapped_column(JSON)

    run: Mapped[LeaderboardRun] = relationship(back_populates="results")

    def __repr__(self) -> str:
        return f"LeaderboardResult(entry={self.entry!r}, split={self.split!r}, accuracy={self.accuracy:.3f})"
