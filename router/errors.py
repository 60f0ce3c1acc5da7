"""Errors of the router: the policy, its store and the complexity classifier.

    RouterError                      base of everything ``router`` raises
    ├── PolicyError                  a policy that does not parse or validate; names each
    │                                bad field (also a ``ValueError``)
    ├── PolicyStoreError             the stored policy cannot be read or written as asked
    │   ├── PolicyConflictError      a compare-and-set lost: the policy changed since the
    │   │                            writer read it; carries the revision that beat it
    │   ├── RevisionNotFoundError    a revision the bucket no longer holds, or a deletion
    │   ├── InvalidRevisionError     a stored revision that holds no valid policy
    │   └── PolicyBucketNotFoundError no policy bucket on this mesh (and none was to be made)
    └── ClassifierError              the complexity classifier cannot be loaded (missing
        │                            file, wrong format or feature version)
        └── ClassifierInputError     a request it cannot score (also a ``ValueError``)

All of them are user errors a person can act on (``tandem policy`` prints the message
and exits non-zero); NATS being away is ``mesh.errors.MeshUnavailableError``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from router.store import StoredPolicy


class RouterError(Exception):
    """Base of every error raised by ``router``."""


class PolicyError(RouterError, ValueError):
    """A policy that does not parse or validate; the message names each bad field."""


class PolicyStoreError(RouterError):
    """The policy store cannot do what was asked."""


class PolicyConflictError(PolicyStoreError):
    """A compare-and-set lost: the policy changed since the writer read it."""

    def __init__(self, expected: int, current: StoredPolicy | None) -> None:
        self.expected = expected
        self.current = current
        now = "nothing is stored" if current is None else f"it is at revision {current.revision}"
        by = f" (by {current.author})" if current and current.author else ""
        super().__init__(
            f"the policy changed since revision {expected}: {now}{by}. "
            "Nothing was written; read it again (tandem policy diff) and re-apply your change."
        )


class RevisionNotFoundError(PolicyStoreError):
    """A revision the policy history no longer holds (or never held), or a deletion."""


class InvalidRevisionError(PolicyStoreError):
    """A stored revision whose policy does not validate, asked for as a policy."""


class PolicyBucketNotFoundError(PolicyStoreError):
    """The mesh has no policy bucket, and the caller asked not to create one."""


class ClassifierError(RouterError):
    """The classifier cannot be loaded (missing file, wrong format or feature version)."""


class ClassifierInputError(ClassifierError, ValueError):
    """A request the classifier cannot score (no tokens, ids outside the vocabulary)."""
