"""API keys and client identities.

Keys come from an env var (plain text, hashed at start-up) or a JSON keys file that holds only
SHA-256 hashes. Every presented key is hashed and compared in constant time against every known
hash, so timing reveals neither which key matched nor how much of it.
"""

from __future__ import annotations

import hashlib
import hmac
from pathlib import Path

import msgspec


def sha256_hex(secret: str) -> str:
    """The hex SHA-256 of a secret, as stored in the keys file."""
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


class Client(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One client identity: an API key and/or an OAuth client secret, with scopes and limits.

    ``scopes`` names the dialects the client may use; ``"*"`` means all of them.
    """

    id: str
    key_sha256: str | None = None
    secret_sha256: str | None = None
    scopes: list[str] = msgspec.field(default_factory=lambda: ["*"])
    rps: float | None = None
    daily: int | None = None
    admin: bool = False
    revoked: bool = False
    created: int | None = None


class KeysFile(msgspec.Struct, kw_only=True):
    """The on-disk keys file."""

    clients: list[Client] = msgspec.field(default_factory=list)


class Principal(msgspec.Struct, frozen=True, kw_only=True):
    """Who is calling, once authenticated."""

    id: str
    scopes: tuple[str, ...] = ("*",)
    rps: float | None = None
    daily: int | None = None
    admin: bool = False

    def allows(self, scope: str) -> bool:
        """True when the principal may use ``scope`` (a dialect name)."""
        return "*" in self.scopes or scope in self.scopes


ANONYMOUS = Principal(id="anonymous", admin=False)


def load_keys_file(path: Path) -> KeysFile:
    """Read a keys file; a missing file is an empty one."""
    if not path.exists():
        return KeysFile()
    return msgspec.json.decode(path.read_bytes(), type=KeysFile)


def save_keys_file(path: Path, keys: KeysFile) -> None:
    """Write a keys file atomically, readable by its owner only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(msgspec.json.format(msgspec.json.encode(keys), indent=2))
    tmp.chmod(0o600)
    tmp.replace(path)


class KeyStore:
    """Looks up principals by presented API key or OAuth client credentials."""

    def __init__(self, clients: list[Client]) -> None:
        self._clients = [c for c in clients if not c.revoked]

    @classmethod
    def from_config(cls, api_keys: str = "", keys_file: Path | None = None) -> KeyStore:
        """Keys from the comma-separated ``api_keys`` plus the clients in ``keys_file``."""
        clients = [
            Client(id=f"env-key-{i}", key_sha256=sha256_hex(k.strip()))
            for i, k in enumerate(filter(None, (k.strip() for k in api_keys.split(","))), 1)
        ]
        if keys_file is not None:
            clients.extend(load_keys_file(keys_file).clients)
        return cls(clients)

    @property
    def enabled(self) -> bool:
        """True when at least one key is configured, so requests must authenticate."""
        return bool(self._clients)

    @staticmethod
    def _to_principal(c: Client) -> Principal:
        return Principal(id=c.id, scopes=tuple(c.scopes), rps=c.rps, daily=c.daily, admin=c.admin)

    def by_key(self, presented: str | None) -> Principal | None:
        """The principal whose API key is ``presented``, or ``None``."""
        if not presented:
            return None
        digest = sha256_hex(presented)
        found: Client | None = None
        for c in self._clients:
            # No early exit: every stored hash is compared.
            if c.key_sha256 and hmac.compare_digest(c.key_sha256, digest):
                found = c
        return self._to_principal(found) if found else None

    def by_client_credentials(self, client_id: str, secret: str) -> Principal | None:
        """The principal for an OAuth client id + secret pair, or ``None``."""
        digest = sha256_hex(secret)
        found: Client | None = None
        for c in self._clients:
            id_ok = hmac.compare_digest(c.id.encode(), client_id.encode())
            secret_ok = bool(c.secret_sha256) and hmac.compare_digest(c.secret_sha256 or "", digest)
            if id_ok and secret_ok:
                found = c
        return self._to_principal(found) if found else None

    def by_id(self, client_id: str) -> Principal | None:
        """The principal with id ``client_id`` (for verified tokens), or ``None`` if revoked/unknown."""
        for c in self._clients:
            if c.id == client_id:
                return self._to_principal(c)
        return None

    def has_client(self, client_id: str) -> bool:
        """True when ``client_id`` exists (and is not revoked)."""
        return any(c.id == client_id for c in self._clients)
