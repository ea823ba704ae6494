"""API keys and client identities.

Keys come from an env var (plain text, hashed at start-up) or a JSON keys file that holds only
SHA-256 hashes. Every presented key is hashed and compared in constant time against every known
hash, so timing reveals neither which key matched nor how much of it.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import time
from pathlib import Path

import msgspec

logger = logging.getLogger(__name__)


class KeysFileError(ValueError):
    """A keys file is missing (where one was named) or cannot be read; the message names it."""


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


def load_keys_file(path: Path, *, missing_ok: bool = True) -> KeysFile:
    """Read a keys file; a missing file is an empty one unless ``missing_ok`` is false.

    Raises :class:`KeysFileError` naming the file when it cannot be read or parsed.
    """
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        if missing_ok:
            return KeysFile()
        raise KeysFileError(f"keys file {path} does not exist (create it with "
                            f"`imagegate keys create --keys-file {path} --id NAME`)") from None
    except OSError as exc:
        raise KeysFileError(f"keys file {path} cannot be read: {exc.strerror}") from None
    try:
        return msgspec.json.decode(data, type=KeysFile)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise KeysFileError(f"keys file {path} is not a valid keys file: {exc}") from None


def save_keys_file(path: Path, keys: KeysFile) -> None:
    """Write a keys file atomically, readable by its owner only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(msgspec.json.format(msgspec.json.encode(keys), indent=2))
    tmp.chmod(0o600)
    tmp.replace(path)


class KeyStore:
    """Looks up principals by presented API key or OAuth client credentials.

    When built from a keys file, the file is re-read whenever its modification time changes, so
    ``imagegate keys create/revoke`` take effect on a running server without a restart.
    """

    def __init__(self, clients: list[Client], *, keys_file: Path | None = None,
                 fixed: list[Client] | None = None) -> None:
        self._all = list(clients)
        self._clients = [c for c in clients if not c.revoked]
        self._keys_file = keys_file
        self._fixed = fixed or []
        self._mtime = _mtime(keys_file)

    @classmethod
    def from_config(cls, api_keys: str = "", keys_file: Path | None = None) -> KeyStore:
        """Keys from the comma-separated ``api_keys`` plus the clients in ``keys_file``."""
        clients = [
            Client(id=f"env-key-{i}", key_sha256=sha256_hex(k.strip()))
            for i, k in enumerate(filter(None, (k.strip() for k in api_keys.split(","))), 1)
        ]
        fixed = list(clients)
        if keys_file is not None:
            # A named file that is missing must not quietly leave the server open.
            clients.extend(load_keys_file(keys_file, missing_ok=False).clients)
        return cls(clients, keys_file=keys_file, fixed=fixed)

    def _refresh(self) -> None:
        if self._keys_file is None:
            return
        mtime = _mtime(self._keys_file)
        if mtime == self._mtime:
            return
        self._mtime = mtime
        try:
            clients = self._fixed + load_keys_file(self._keys_file, missing_ok=False).clients
        except KeysFileError as exc:
            # Keep the last good set: a broken edit must neither open the server nor lock
            # everyone out. Logged once per change of the file.
            logger.error("%s; still using the %d client(s) loaded before", exc, len(self._all))
            return
        self._all = clients
        self._clients = [c for c in clients if not c.revoked]

    @property
    def enabled(self) -> bool:
        """True when at least one key is configured, so requests must authenticate.

        Revoked clients count: revoking the last client must not turn the server open.
        """
        self._refresh()
        return bool(self._all)

    def client(self, client_id: str) -> Client | None:
        """The (non-revoked) client record with id ``client_id``, or ``None``."""
        self._refresh()
        found: Client | None = None
        for c in self._clients:
            if hmac.compare_digest(c.id.encode(), client_id.encode()):
                found = c
        return found

    @staticmethod
    def principal_of(c: Client) -> Principal:
        """The :class:`Principal` of a client record."""
        return Principal(id=c.id, scopes=tuple(c.scopes), rps=c.rps, daily=c.daily, admin=c.admin)

    def by_key(self, presented: str | None) -> Principal | None:
        """The principal whose API key is ``presented``, or ``None``."""
        if not presented:
            return None
        self._refresh()
        digest = sha256_hex(presented)
        found: Client | None = None
        for c in self._clients:
            # No early exit: every stored hash is compared.
            if c.key_sha256 and hmac.compare_digest(c.key_sha256, digest):
                found = c
        return self.principal_of(found) if found else None

    def by_client_credentials(self, client_id: str, secret: str) -> Principal | None:
        """The principal for an OAuth client id + secret pair, or ``None``."""
        self._refresh()
        digest = sha256_hex(secret)
        found: Client | None = None
        for c in self._clients:
            id_ok = hmac.compare_digest(c.id.encode(), client_id.encode())
            secret_ok = bool(c.secret_sha256) and hmac.compare_digest(c.secret_sha256 or "", digest)
            if id_ok and secret_ok:
                found = c
        return self.principal_of(found) if found else None

    def by_id(self, client_id: str) -> Principal | None:
        """The principal with id ``client_id`` (for verified tokens), or ``None`` if revoked/unknown."""
        c = self.client(client_id)
        return self.principal_of(c) if c else None


def _mtime(path: Path | None) -> float | None:
    try:
        return path.stat().st_mtime_ns if path is not None else None
    except OSError:
        return None


def new_client(
    client_id: str,
    *,
    scopes: list[str] | None = None,
    rps: float | None = None,
    daily: int | None = None,
    admin: bool = False,
) -> tuple[Client, str, str]:
    """A fresh client with a random API key and OAuth secret: (record, api_key, secret).

    The record holds only hashes; the plain key and secret are returned once, to be shown.
    """
    api_key = "ig-" + secrets.token_urlsafe(32)
    secret = secrets.token_urlsafe(32)
    record = Client(id=client_id, key_sha256=sha256_hex(api_key), secret_sha256=sha256_hex(secret),
                    scopes=scopes or ["*"], rps=rps, daily=daily, admin=admin,
                    created=int(time.time()))
    return record, api_key, secret
