"""Routing artifacts (``Artifacts``: the rows) and the artifact store (``ArtifactStore``: a folder
tree that holds expert files and routing artifacts).

Layout under the root::

    experts/<name>/<version>/...          an expert's files (adapter or full model)
    routers/<router>/<expert@version|_all>/<kind>-<id>/...   a router's fitted artifacts
    .staging/<random>/                    files being registered; moved into place on commit

Files are copied into ``.staging`` first (hashing as they go), then moved with one rename once
the database rows are flushed, so a refused or failed registration leaves nothing behind.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path, PurePosixPath

from sqlalchemy import select

from registry.db import SessionScope
from registry.errors import MoergeError
from registry.models import Artifact, Expert
from registry.validation import Limits, SourceFile, check_name, scan_source

STAGING = ".staging"
CHUNK = 1 << 20


class ArtifactStore:
    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root).expanduser().resolve()

    # --- paths -----------------------------------------------------------------------------------

    def resolve(self, rel: str | PurePosixPath) -> Path:
        """The absolute path of a store-relative path; refuses anything outside the root."""
        path = (self.root / str(rel)).resolve()
        if not path.is_relative_to(self.root) or path == self.root:
            raise ValueError(f"{rel!r} is not a path inside the artifact store")
        return path

    @staticmethod
    def expert_rel(name: str, version: str) -> str:
        return f"experts/{name}/{version}"

    @staticmethod
    def artifact_rel(router: str, owner: str, kind: str) -> str:
        return f"routers/{router}/{owner}/{kind}-{uuid.uuid4().hex[:12]}"

    # --- staging ---------------------------------------------------------------------------------

    def stage(self) -> Path:
        for _ in range(3):  # a concurrent discard may prune .staging between mkdir and mkdtemp
            (self.root / STAGING).mkdir(parents=True, exist_ok=True)
            try:
                return Path(tempfile.mkdtemp(prefix="stage-", dir=self.root / STAGING))
            except FileNotFoundError:
                continue
        raise OSError(f"could not create a staging folder under {self.root / STAGING}")

    def copy_in(self, files: Iterable[SourceFile], staging: Path) -> tuple[str, int]:
        """Copy files into ``staging``; returns (tree checksum, total bytes).

        A file that changed size since it was validated is refused (it is being rewritten).
        """
        digests: dict[str, str] = {}
        total = 0
        for f in files:
            dest = staging / str(f.rel)
            dest.parent.mkdir(parents=True, exist_ok=True)
            h = hashlib.sha256()
            size = 0
            with open(f.path, "rb") as src, open(dest, "xb") as out:
                while chunk := src.read(CHUNK):
                    h.update(chunk)
                    out.write(chunk)
                    size += len(chunk)
            if size != f.size:
                raise OSError(f"{f.rel} changed while it was being copied")
            digests[str(f.rel)] = h.hexdigest()
            total += size
        return tree_checksum(digests), total

    def write_bytes(self, data: bytes, staging: Path, filename: str) -> tuple[str, int]:
        with open(staging / filename, "xb") as out:
            out.write(data)
        return tree_checksum({filename: hashlib.sha256(data).hexdigest()}), len(data)

    def publish(self, staging: Path, rel: str) -> Path:
        """Move a staged folder to ``rel`` in one rename. A folder already there has no row
        (the caller holds the row's unique key), so it is a leftover of a crash: replace it."""
        final = self.resolve(rel)
        if final.exists():
            shutil.rmtree(final)
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging, final)
        self._prune(staging.parent)
        return final

    def trash(self, rel: str) -> Path | None:
        """Move ``rel`` aside (to be deleted on commit, or restored with ``restore``)."""
        path = self.resolve(rel)
        if not path.exists():
            return None
        (self.root / STAGING).mkdir(parents=True, exist_ok=True)
        aside = self.root / STAGING / f"trash-{uuid.uuid4().hex}"
        os.replace(path, aside)
        self._prune(path.parent)
        return aside

    def restore(self, aside: Path, rel: str) -> None:
        final = self.resolve(rel)
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(aside, final)
        self._prune(aside.parent)

    def discard(self, path: Path | None) -> None:
        """Delete a staged, trashed or published folder and prune the empty folders above it."""
        if path is None:
            return
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        self._prune(path.parent)

    def _prune(self, folder: Path) -> None:
        """Remove empty folders from ``folder`` up to (not including) the root."""
        while folder != self.root and folder.is_relative_to(self.root):
            try:
                folder.rmdir()
            except OSError:  # not empty (or already gone and a sibling holds the parent)
                if folder.exists():
                    return
            folder = folder.parent


def tree_checksum(digests: dict[str, str]) -> str:
    """sha256 over the sorted (relative path, file sha256) pairs of a folder."""
    h = hashlib.sha256()
    for rel in sorted(digests):
        h.update(f"{rel}\0{digests[rel]}\n".encode())
    return h.hexdigest()


def file_digests(folder: Path) -> dict[str, str]:
    out = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(CHUNK):
                h.update(chunk)
        out[path.relative_to(folder).as_posix()] = h.hexdigest()
    return out


def verify(folder: Path, checksum: str) -> bool:
    """Whether a stored folder still matches its recorded checksum."""
    return folder.is_dir() and tree_checksum(file_digests(folder)) == checksum


# --- routing artifacts: the rows -----------------------------------------------------------------


class Artifacts:
    """The ``artifacts`` rows (what a router fitted, per expert or for the router as a whole) and
    their files in the store. ``get_expert``: ``Experts.get_expert``, to resolve an expert name."""

    def __init__(
        self,
        session: SessionScope,
        reading: SessionScope,
        store: ArtifactStore,
        limits: Limits,
        get_expert: Callable[[str, str | None], Expert],
    ) -> None:
        self._session = session
        self._reading = reading
        self.store = store
        self.limits = limits
        self._get_expert = get_expert

    def add_artifact(
        self,
        router: str,
        kind: str,
        data: bytes | str | os.PathLike,
        expert: str | None = None,
        version: str | None = None,
        filename: str = "artifact.bin",
    ) -> Artifact:
        """Store a router's artifact for an expert (latest version unless given), or for the
        router as a whole when ``expert`` is None. Replaces an earlier one of the same kind.

        ``data``: bytes (written as ``filename``), or a file or folder to copy in.
        """
        check_name(router, "router name")
        check_name(kind, "artifact kind")
        target = self._get_expert(expert, version) if expert is not None else None
        staged = self.store.stage()
        published: Path | None = None
        replaced: list[str] = []
        try:
            if isinstance(data, (bytes, bytearray)):
                check_name(filename, "artifact filename")
                checksum, size = self.store.write_bytes(bytes(data), staged, filename)
            else:
                src = Path(data)
                if src.is_dir():
                    _, files = scan_source(src, self.limits)
                elif src.is_file():
                    files = [SourceFile(rel=PurePosixPath(src.name), path=src.resolve(), size=src.stat().st_size)]
                else:
                    raise MoergeError(f"artifact source {str(data)!r} does not exist")
                checksum, size = self.store.copy_in(files, staged)
            owner = target.ref if target is not None else "_all"
            rel = ArtifactStore.artifact_rel(router, owner, kind)
            with self._session() as s:
                q = select(Artifact).where(Artifact.router == router, Artifact.kind == kind)
                q = q.where(Artifact.expert_id == target.id if target is not None else Artifact.expert_id.is_(None))
                for previous in s.scalars(q):
                    s.delete(previous)
                    replaced.append(previous.path)
                s.flush()
                row = Artifact(
                    expert_id=target.id if target is not None else None,
                    router=router,
                    kind=kind,
                    path=rel,
                    checksum=checksum,
                    size_bytes=size,
                )
                s.add(row)
                s.flush()
                published = self.store.publish(staged, rel)
        except BaseException:
            self.store.discard(published)
            raise
        finally:
            if staged.exists():
                self.store.discard(staged)
        for rel in replaced:  # the new artifact is committed: the old files can go
            self.store.discard(self.store.resolve(rel))
        return row

    def get_artifacts(
        self,
        router: str | None = None,
        expert: str | None = None,
        version: str | None = None,
        kind: str | None = None,
    ) -> list[Artifact]:
        """Artifacts filtered by router, expert (latest version unless given) and kind."""
        expert_id = self._get_expert(expert, version).id if expert is not None else None
        with self._reading() as s:
            q = select(Artifact)
            if router is not None:
                q = q.where(Artifact.router == router)
            if expert_id is not None:
                q = q.where(Artifact.expert_id == expert_id)
            if kind is not None:
                q = q.where(Artifact.kind == kind)
            return list(s.scalars(q.order_by(Artifact.id)))

    def artifact_path(self, artifact: Artifact) -> Path:
        return self.store.resolve(artifact.path)

    def remove_artifacts(self, router: str, expert: str | None = None, version: str | None = None) -> int:
        """Delete a router's artifacts (for one expert, or all of them) with their files."""
        expert_id = self._get_expert(expert, version).id if expert is not None else None
        rels: list[str] = []
        with self._session() as s:
            q = select(Artifact).where(Artifact.router == router)
            if expert_id is not None:
                q = q.where(Artifact.expert_id == expert_id)
            for a in s.scalars(q):
                rels.append(a.path)
                s.delete(a)
        for rel in rels:
            self.store.discard(self.store.resolve(rel))
        return len(rels)
