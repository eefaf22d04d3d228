"""HTTPS and basic authentication for the HTTP endpoint.

The file has the format of the Prometheus exporter-toolkit's web
configuration, so one file can serve every exporter on a host::

    tls_server_config:
      cert_file: server.crt            # paths relative to this file
      key_file: server.key
      client_auth_type: RequireAndVerifyClientCert
      client_ca_file: clients-ca.crt
      min_version: TLS12
    basic_auth_users:
      prometheus: $2b$12$...           # bcrypt hash

The file and the files it names are checked for changes at most once a
second; new connections get the new TLS context and new requests the new
users, without a restart. A change that does not load is logged and the
previous configuration stays in force.
"""

from __future__ import annotations

import binascii
import hashlib
import hmac
import logging
import os
import re
import secrets
import ssl
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import bcrypt
import yaml

log = logging.getLogger(__name__)

RELOAD_CHECK_SECONDS = 1.0
CACHE_LIMIT = 1000
"""Verified credentials remembered per configuration; only successes enter."""

# Python's TLS cannot accept a client certificate without verifying it, so
# RequestClientCert asks for none (nothing would check it) and
# RequireAnyClientCert verifies against client_ca_file like
# RequireAndVerifyClientCert: stricter than Go, never looser.
CLIENT_AUTH: dict[str, tuple[ssl.VerifyMode, bool]] = {
    "NoClientCert": (ssl.CERT_NONE, False),
    "RequestClientCert": (ssl.CERT_NONE, False),
    "RequireAnyClientCert": (ssl.CERT_REQUIRED, True),
    "VerifyClientCertIfGiven": (ssl.CERT_OPTIONAL, True),
    "RequireAndVerifyClientCert": (ssl.CERT_REQUIRED, True),
}  # name: (verify mode, needs client_ca_file)
TLS_VERSIONS = {"TLS12": ssl.TLSVersion.TLSv1_2, "TLS13": ssl.TLSVersion.TLSv1_3}
TLS_KEYS = ("cert_file", "key_file", "client_auth_type", "client_ca_file", "min_version")
TOP_KEYS = ("tls_server_config", "basic_auth_users")
BCRYPT_HASH = re.compile(r"\$2[aby]\$\d\d\$[./A-Za-z0-9]{53}")

_CACHE_KEY = secrets.token_bytes(32)
"""Keys the credential cache, so what it holds is useless outside this process."""


class WebConfigError(ValueError):
    """A mistake in the web configuration, worded for one line naming the key."""


@dataclass(frozen=True)
class WebConfig:
    """One loaded web configuration."""

    ssl_context: ssl.SSLContext | None
    users: Mapping[str, bytes]
    files: tuple[str, ...]
    """The file and the certificate files it names: a change to any reloads."""
    verified: set[bytes] = field(default_factory=set)

    def authorized(self, header: str | None) -> bool:
        """Whether an ``Authorization`` header satisfies ``basic_auth_users`` (if any)."""
        users = self.users
        if not users:
            return True
        scheme, _, encoded = (header or "").partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            credentials = binascii.a2b_base64(encoded.strip(), strict_mode=True).decode()
        except (binascii.Error, UnicodeError):
            return False
        user, _, password = credentials.partition(":")
        key = hmac.digest(_CACHE_KEY, f"{user}\0{password}".encode(), hashlib.sha256)
        if key in self.verified:
            return True
        stored = users.get(user)
        # An unknown user costs a bcrypt check too, so timing does not tell users apart.
        try:
            ok = bcrypt.checkpw(password.encode(), stored or next(iter(users.values())))
        except ValueError:  # bcrypt refuses passwords past 72 bytes
            return False
        if not (ok and stored):
            return False
        if len(self.verified) >= CACHE_LIMIT:
            self.verified.clear()
        self.verified.add(key)
        return True


def load(path: str) -> WebConfig:
    """Read and check the file; ``WebConfigError`` names the first wrong key."""
    try:
        with open(path, encoding="utf-8") as stream:
            data = yaml.safe_load(stream)
    except OSError as exc:
        raise WebConfigError(f"cannot read {path}: {exc.strerror}") from None
    except yaml.YAMLError:
        raise WebConfigError(f"{path} is not valid YAML") from None
    data = _mapping(data, "the file")
    for key in data:
        if key not in TOP_KEYS:
            raise WebConfigError(f"{key}: unknown key (known: {', '.join(TOP_KEYS)})")
    base = os.path.dirname(os.path.abspath(path))
    files = [path]
    context = None
    if data.get("tls_server_config") is not None:
        context = _tls_context(
            _mapping(data["tls_server_config"], "tls_server_config"), base, files
        )
    users = {}
    for user, hashed in _mapping(data.get("basic_auth_users"), "basic_auth_users").items():
        if not isinstance(user, str) or not user or ":" in user:
            raise WebConfigError(f"basic_auth_users: {user!r} is not a valid user name")
        if not isinstance(hashed, str) or not BCRYPT_HASH.fullmatch(hashed):
            raise WebConfigError(f"basic_auth_users.{user}: expected a bcrypt hash ($2b$...)")
        users[user] = hashed.encode()
    return WebConfig(context, users, tuple(files))


def _mapping(value: Any, where: str) -> dict[Any, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise WebConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
    return value


def _tls_context(section: dict[Any, Any], base: str, files: list[str]) -> ssl.SSLContext:
    for key in section:
        if key not in TLS_KEYS:
            raise WebConfigError(
                f"tls_server_config.{key}: unknown key (known: {', '.join(TLS_KEYS)})"
            )
    paths = {}
    for key in ("cert_file", "key_file", "client_ca_file"):
        value = section.get(key)
        if value in (None, ""):
            if key != "client_ca_file":
                raise WebConfigError(f"tls_server_config.{key}: required")
            continue
        if not isinstance(value, str):
            raise WebConfigError(f"tls_server_config.{key}: expected a path, got {value!r}")
        paths[key] = os.path.join(base, value)
        if not os.path.isfile(paths[key]):
            raise WebConfigError(f"tls_server_config.{key}: no such file {paths[key]}")
        files.append(paths[key])
    auth = section.get("client_auth_type")
    if auth is None and "client_ca_file" in paths:
        raise WebConfigError("tls_server_config.client_auth_type: required with client_ca_file")
    auth = auth or "NoClientCert"
    if auth not in CLIENT_AUTH:
        raise WebConfigError(
            f"tls_server_config.client_auth_type: expected one of "
            f"{', '.join(CLIENT_AUTH)}, got {auth!r}"
        )
    verify_mode, needs_ca = CLIENT_AUTH[auth]
    if needs_ca and "client_ca_file" not in paths:
        raise WebConfigError(f"tls_server_config.client_ca_file: required with {auth}")
    version = section.get("min_version") or "TLS12"
    if version not in TLS_VERSIONS:
        raise WebConfigError(
            f"tls_server_config.min_version: expected one of "
            f"{', '.join(TLS_VERSIONS)}, got {version!r}"
        )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = TLS_VERSIONS[version]
    try:
        context.load_cert_chain(paths["cert_file"], paths["key_file"])
    except (ssl.SSLError, OSError) as exc:
        raise WebConfigError(
            f"tls_server_config.cert_file, key_file: cannot load the certificate and its key: {exc}"
        ) from None
    if "client_ca_file" in paths:
        try:
            context.load_verify_locations(paths["client_ca_file"])
        except (ssl.SSLError, OSError) as exc:
            raise WebConfigError(f"tls_server_config.client_ca_file: {exc}") from None
    context.verify_mode = verify_mode
    return context


def _stamp(files: tuple[str, ...]) -> tuple[tuple[int, int, int] | None, ...]:
    """What changes when any of the files is rewritten or replaced."""
    stamps = []
    for path in files:
        try:
            info = os.stat(path)
        except OSError:
            stamps.append(None)
        else:
            stamps.append((info.st_mtime_ns, info.st_size, info.st_ino))
    return tuple(stamps)


class WebSecurity:
    """The web configuration in force, reloaded when its files change."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._config = load(path)
        self._stamp = _stamp(self._config.files)
        self._checked = time.monotonic()
        self._lock = threading.Lock()

    def current(self) -> WebConfig:
        """The configuration for a new connection or request."""
        now = time.monotonic()
        if now - self._checked >= RELOAD_CHECK_SECONDS and self._lock.acquire(blocking=False):
            try:
                self._checked = now
                self._reload_if_changed()
            finally:
                self._lock.release()
        return self._config

    def _reload_if_changed(self) -> None:
        stamp = _stamp(self._config.files)
        if stamp == self._stamp:
            return
        self._stamp = stamp  # a bad change is reported once, then waits for the next one
        try:
            config = load(self.path)
        except WebConfigError as exc:
            log.error("web config %s: %s; keeping the previous configuration", self.path, exc)
            return
        self._config = config
        self._stamp = _stamp(config.files)
        log.info("web config %s reloaded", self.path)
