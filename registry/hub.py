"""Models on the Hugging Face Hub, registered by reference: ``hf://owner/name[@revision]``.

A base registered this way is not copied anywhere by moerge. huggingface_hub downloads it into its
own cache (``HF_HUB_CACHE``, as transformers and vLLM would), the registry keeps the reference
pinned to the commit the revision named at registration (``hf://owner/name@<commit>``), and every
process that loads the base asks the cache for that commit: a hit costs no network, a miss on
another node downloads the same bytes. Where the hub cannot be reached (no network,
``HF_HUB_OFFLINE=1``) and the cache has no such snapshot, the error says so and what to do.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from registry.errors import MoergeError, RegistrationError

SCHEME = "hf://"
# owner/name as the hub spells repository ids; a revision is a branch, a tag or a commit
_REPO = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
_REVISION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,199}$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")


class HubUnavailableError(MoergeError):
    """A hub model that is neither in the local cache nor downloadable from here."""


@dataclass(frozen=True)
class HubRef:
    repo: str
    revision: str | None = None  # None: the repository's default branch

    @property
    def uri(self) -> str:
        return SCHEME + self.repo + (f"@{self.revision}" if self.revision else "")

    @property
    def pinned(self) -> bool:
        return self.revision is not None and bool(_COMMIT.match(self.revision))


def is_hub_uri(text: str | object) -> bool:
    return isinstance(text, str) and text.startswith(SCHEME)


def parse_hub_uri(uri: str) -> HubRef:
    """``hf://owner/name`` or ``hf://owner/name@revision``; anything else is refused by name."""
    body = uri[len(SCHEME) :] if uri.startswith(SCHEME) else uri
    repo, sep, revision = body.partition("@")
    if not _REPO.match(repo) or (sep and not _REVISION.match(revision)):
        raise RegistrationError(
            f"{uri!r} is not a hub reference: write hf://owner/name or hf://owner/name@revision "
            "(a branch, a tag or a commit)"
        )
    return HubRef(repo, revision or None)


def fetch(ref: HubRef, error: type[MoergeError] = HubUnavailableError) -> tuple[Path, HubRef]:
    """The local snapshot folder of ``ref`` (downloaded into the HF cache when it is not there
    yet) and the reference pinned to its commit. Raises ``error`` naming why it cannot be had."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if ref.pinned:  # a commit already in the cache is used as is: no network round trip
        try:
            folder = Path(snapshot_download(ref.repo, revision=ref.revision, local_files_only=True))
            return folder, ref
        except LocalEntryNotFoundError:
            pass
    try:
        folder = Path(snapshot_download(ref.repo, revision=ref.revision))
    except GatedRepoError as exc:
        raise error(f"{ref.uri}: the repository is gated; accept its terms and set HF_TOKEN ({exc})") from exc
    except RepositoryNotFoundError as exc:
        raise error(f"{ref.uri}: no such repository on the hub, or it is private and HF_TOKEN is not set") from exc
    except RevisionNotFoundError as exc:
        raise error(f"{ref.uri}: the repository has no revision {ref.revision!r}") from exc
    except LocalEntryNotFoundError as exc:
        raise error(
            f"{ref.uri}: the hub cannot be reached from here (no network, or HF_HUB_OFFLINE is set) and "
            "the Hugging Face cache (HF_HUB_CACHE) holds no snapshot of it. Download it where the hub "
            "is reachable (huggingface-cli download), or register a local folder instead"
        ) from exc
    except (HfHubHTTPError, OSError) as exc:
        raise error(f"{ref.uri}: the download failed: {exc}") from exc
    # snapshot_download returns .../snapshots/<commit>: the pin for every later load
    return folder, HubRef(ref.repo, folder.name)


def model_folder(uri: str) -> Path:
    """The local folder a registered model's ``uri`` names: the folder itself, or for a hub
    reference the cached snapshot of its pinned commit (downloaded on first use)."""
    if not is_hub_uri(uri):
        return Path(uri)
    folder, _ = fetch(parse_hub_uri(uri))
    return folder
