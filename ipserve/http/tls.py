"""TLS in the workers: the SSLContext built from the settings, the files the
master hands each worker, and every failure said in one line.

Why the master hands the files over: workers run as `user` (often nobody),
and private keys are usually readable by root only (0600, certbot's
/etc/letsencrypt/live/...). The master, root, reads certfile, keyfile and
ca_certs each time it starts a worker, copies each into an anonymous file
(memfd, sealed against change) and passes its descriptor like the listening
sockets; the worker loads it through /proc/self/fd/N and closes it before the
application is imported. Key material is never on a command line, in the
environment or on disk anywhere but where the operator put it, and a key
file need not be readable by the worker's user. A worker reads the files as
they are when it starts, as it imports the application's code as it is then:
a HUP after a renewal serves the new certificate.

Nothing here imports gevent: the master uses it to check the files at start.
In a worker `ssl` is gevent's (monkey-patched), so the context's sockets are
cooperative.
"""

from __future__ import annotations

import enum
import fcntl
import os
import ssl
from collections.abc import Mapping
from dataclasses import dataclass

from ipserve import runtime
from ipserve.errors import UsageError

ALPN = ["http/1.1"]
# No TLS compression (CRIME), the server's cipher order, fresh ECDH keys, and
# no client-initiated renegotiation (a cheap way to make a server do handshakes).
OPTIONS = (ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE | ssl.OP_SINGLE_ECDH_USE
           | ssl.OP_NO_RENEGOTIATION)
MINIMUM_VERSIONS = {"TLSv1.2": ssl.TLSVersion.TLSv1_2, "TLSv1.3": ssl.TLSVersion.TLSv1_3}
FILE_SETTINGS = ("certfile", "keyfile", "ca_certs")
_SEALS = fcntl.F_SEAL_WRITE | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL
# OpenSSL's reasons for a key that does not belong to the certificate (the
# second: a key of another type than the certificate's, e.g. RSA for ECDSA).
_MISMATCH = ("KEY_VALUES_MISMATCH", "NO_CERTIFICATE_ASSIGNED")
# OpenSSL's reasons for plain HTTP where a ClientHello should be.
PLAIN_HTTP = ("HTTP_REQUEST", "HTTPS_PROXY_REQUEST")


class ClientVerify(enum.Enum):
    NONE = "none"
    OPTIONAL = "optional"       # a certificate is checked if the client sends one
    REQUIRED = "required"


VERIFY_MODES = {ClientVerify.NONE: ssl.CERT_NONE, ClientVerify.OPTIONAL: ssl.CERT_OPTIONAL,
                ClientVerify.REQUIRED: ssl.CERT_REQUIRED}


class TlsError(Exception):
    """One line naming the setting and its file (or value), and what is wrong."""


@dataclass(frozen=True)
class TlsSettings:
    certfile: str
    keyfile: str | None
    ca_certs: str | None
    verify: ClientVerify
    minimum_version: str
    ciphers: str | None

    @classmethod
    def from_settings(cls, values: Mapping) -> TlsSettings | None:
        """From the settings (a Config's values, or a worker's spec); None:
        no certfile, plain HTTP."""
        if not values.get("certfile"):
            return None
        return cls(certfile=values["certfile"], keyfile=values.get("keyfile"),
                   ca_certs=values.get("ca_certs"),
                   verify=ClientVerify(values.get("ssl_client_verify") or "none"),
                   minimum_version=values.get("ssl_minimum_version") or "TLSv1.2",
                   ciphers=values.get("ssl_ciphers"))

    def files(self) -> dict[str, str]:
        """Setting -> configured path, for the files that are set."""
        return {name: path for name in FILE_SETTINGS
                if (path := getattr(self, name)) is not None}


# ---------------------------------------------------------------- the context
def build_context(settings: TlsSettings, paths: Mapping[str, str]) -> ssl.SSLContext:
    """The server's SSLContext. `paths`: setting -> where to read that file
    (the configured path, or /proc/self/fd/N in a worker); errors name the
    configured path."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.options |= OPTIONS
    ctx.minimum_version = MINIMUM_VERSIONS[settings.minimum_version]
    ctx.set_alpn_protocols(ALPN)
    if settings.ciphers is not None:
        try:
            ctx.set_ciphers(settings.ciphers)
        except ssl.SSLError:
            raise TlsError(f"ssl_ciphers {settings.ciphers!r}: OpenSSL selects no cipher with "
                           f"it (see `openssl ciphers -v 'LIST'`)") from None
    _check_certificates("certfile", settings.certfile, paths["certfile"])
    _load_chain(ctx, settings, paths)
    if settings.ca_certs is not None:
        _check_certificates("ca_certs", settings.ca_certs, paths["ca_certs"], ctx)
    ctx.verify_mode = VERIFY_MODES[settings.verify]
    return ctx


def _check_certificates(setting: str, shown: str, path: str,
                        ctx: ssl.SSLContext | None = None) -> None:
    """The file holds PEM certificates (loaded as trust anchors into `ctx`,
    or into a scratch context only to tell a bad certfile from a bad key)."""
    ctx = ctx or ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        ctx.load_verify_locations(cafile=path)
    except ssl.SSLError:
        raise TlsError(f"{setting} {shown}: no PEM certificate in it") from None
    except OSError as exc:
        raise TlsError(f"{setting} {shown}: {exc.strerror or exc}") from None


def _load_chain(ctx: ssl.SSLContext, settings: TlsSettings, paths: Mapping[str, str]) -> None:
    key_setting, key_shown = (("keyfile", settings.keyfile) if settings.keyfile is not None
                              else ("certfile", settings.certfile))

    def no_passphrase():
        # Called by OpenSSL only for an encrypted key: nobody could type it.
        raise TlsError(f"{key_setting} {key_shown}: the key is encrypted with a passphrase "
                       f"(not supported: decrypt it, e.g. `openssl pkey -in KEY -out NEW`)")

    try:
        ctx.load_cert_chain(paths["certfile"], paths.get("keyfile"), password=no_passphrase)
    except ssl.SSLError as exc:
        if exc.reason in _MISMATCH:
            also = f" (keyfile {settings.keyfile})" if settings.keyfile is not None else ""
            raise TlsError(f"certfile {settings.certfile}: the key{also} does not match the "
                           f"certificate") from None
        raise TlsError(f"{key_setting} {key_shown}: no PEM private key in it") from None
    except OSError as exc:
        raise TlsError(f"{key_setting} {key_shown}: {exc.strerror or exc}") from None


# ---------------------------------------------------------------- master -> worker
def read_files(settings: TlsSettings) -> dict[str, bytes]:
    """Setting -> the file's content, read now (by the master, as root)."""
    contents = {}
    for setting, path in settings.files().items():
        try:
            contents[setting] = runtime.read_trusted_file(path, setting)
        except UsageError as exc:
            raise TlsError(str(exc)) from None
    return contents


def seal(name: str, data: bytes) -> int:
    """A read-only anonymous file holding `data` (close-on-exec: only a child
    it is explicitly passed to gets it)."""
    fd = os.memfd_create(f"ipserve-{name}", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)
    except BaseException:
        os.close(fd)
        raise
    return fd


def seal_all(contents: Mapping[str, bytes]) -> dict[str, int]:
    fds: dict[str, int] = {}
    try:
        for setting, data in contents.items():
            fds[setting] = seal(setting, data)
    except BaseException:
        close_all(fds)
        raise
    return fds


def close_all(fds: Mapping[str, int]) -> None:
    for fd in fds.values():
        try:
            os.close(fd)
        except OSError:
            pass


def fd_paths(fds: Mapping[str, int]) -> dict[str, str]:
    return {setting: f"/proc/self/fd/{fd}" for setting, fd in fds.items()}


def check(settings: TlsSettings) -> None:
    """At start, in the master: read the files and build the context exactly
    as a worker will (from sealed copies), so that what would keep every
    worker from booting is refused at once. Raises TlsError."""
    fds = seal_all(read_files(settings))
    try:
        build_context(settings, fd_paths(fds))
    finally:
        close_all(fds)


def worker_context(spec: Mapping) -> ssl.SSLContext | None:
    """In a worker: the context from the files the master passed (their
    descriptors are closed here, whatever happens); None without TLS."""
    settings = TlsSettings.from_settings(spec)
    fds = dict(spec.get("tls_fds") or {})
    try:
        if settings is None:
            return None
        if spec.get("tls_error"):
            raise TlsError(spec["tls_error"])       # the master could not read a file
        return build_context(settings, fd_paths(fds))
    finally:
        close_all(fds)


# ---------------------------------------------------------------- connections
def handshake_failure(exc: OSError, timed_out: bool) -> tuple[str, str]:
    """(kind, detail) of a failed handshake, for the rate-limited client error log."""
    if timed_out:
        return "TLS handshake timeout", ""
    reason = getattr(exc, "reason", None)
    if reason in PLAIN_HTTP:
        return "plain HTTP on the TLS port", ""
    if reason:
        return "TLS handshake failed", reason.lower().replace("_", " ")
    return "TLS handshake failed", exc.strerror or type(exc).__name__


def is_plain_http(exc: OSError) -> bool:
    return getattr(exc, "reason", None) in PLAIN_HTTP


# getpeercert()'s attribute names -> RFC 4514's (the rest keep their long name).
_SHORT_NAMES = {"commonName": "CN", "organizationName": "O", "organizationalUnitName": "OU",
                "countryName": "C", "stateOrProvinceName": "ST", "localityName": "L",
                "streetAddress": "STREET", "domainComponent": "DC", "userId": "UID"}


def _escape(value: str) -> str:
    out = "".join("\\" + c if c in ',+"\\<>;=' else c for c in value)
    if out[:1] in ("#", " "):
        out = "\\" + out
    if out.endswith(" ") and not out.endswith("\\ "):
        out = out[:-1] + "\\ "
    return out


def subject_dn(cert: Mapping | None) -> str | None:
    """A verified client certificate's subject as an RFC 4514 string
    ("CN=alice,O=Example"), from ssl's getpeercert() dict; None if none."""
    if not cert or not cert.get("subject"):
        return None
    rdns = []
    for rdn in reversed(cert["subject"]):
        rdns.append("+".join(f"{_SHORT_NAMES.get(name, name)}={_escape(value)}"
                             for name, value in rdn))
    return ",".join(rdns)
