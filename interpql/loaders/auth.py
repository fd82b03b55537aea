"""API keys. Only their SHA-256 hashes are kept (configured as keys or as hashes), compared in
constant time; a key is known to the rest of the server by a short id derived from its hash."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable

from interpql.errors import UnauthenticatedError


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class ApiKeys:
    def __init__(self, keys: Iterable[str] = (), hashes: Iterable[str] = ()) -> None:
        self._hashes = [hash_key(k) for k in keys] + [h.lower() for h in hashes]

    def __bool__(self) -> bool:
        return bool(self._hashes)

    def identify(self, authorization: str | None) -> str | None:
        """The key id of a valid `Authorization: Bearer <key>` header, else None."""
        if not authorization or not authorization.startswith("Bearer "):
            return None
        digest = hash_key(authorization.removeprefix("Bearer ").strip())
        matched = False
        for known in self._hashes:  # every comparison runs: no early exit to time
            matched |= hmac.compare_digest(digest, known)
        return f"key-{digest[:12]}" if matched else None

    def require(self, authorization: str | None) -> str:
        key_id = self.identify(authorization)
        if key_id is None and not self._hashes:
            raise UnauthenticatedError(
                "This operation needs an API key, and this server has none configured, so no "
                "key can work: start it with --api-key <key> (or $INTERPQL_API_KEYS, "
                "comma-separated; --api-key-hash <sha256> keeps the key itself off the command "
                "line)."
            )
        if key_id is None:
            raise UnauthenticatedError(
                "This operation needs an API key: send 'Authorization: Bearer <key>'."
            )
        return key_id
