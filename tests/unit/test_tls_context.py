"""ipserve.http.tls: the SSLContext built from the settings, the sealed files
the master hands a worker, and the one-line errors (real certificates, made
with the openssl command; the ssl module cannot make them)."""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import ssl
import subprocess

import pytest

from ipserve.http import tls
from ipserve.http.tls import ClientVerify, TlsError, TlsSettings

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed")


def openssl(*args: str, cwd) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A CA, a server certificate (EC) signed by it, an RSA key, a second EC
    key, an encrypted key, a combined key+certificate file, and junk."""
    d = tmp_path_factory.mktemp("pki")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
    openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
            "-subj", "/CN=unit CA", cwd=d)
    openssl("req", *ec, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=localhost",
            cwd=d)
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", "server.pem", "-days", "2", cwd=d)
    openssl("req", *ec, "-keyout", "other.key", "-out", "other.csr", "-subj", "/CN=other", cwd=d)
    openssl("genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048",
            "-out", "rsa.key", cwd=d)
    openssl("genpkey", "-algorithm", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
            "-aes256", "-pass", "pass:secret", "-out", "encrypted.key", cwd=d)
    (d / "combined.pem").write_bytes((d / "server.key").read_bytes()
                                     + (d / "server.pem").read_bytes())
    (d / "junk.pem").write_text("not a PEM file\n")
    return d


def settings(pki, certfile="server.pem", keyfile="server.key", **kw) -> TlsSettings:
    values = {"certfile": str(pki / certfile) if certfile else None,
              "keyfile": str(pki / keyfile) if keyfile else None, **kw}
    return TlsSettings.from_settings(values)


def build(s: TlsSettings) -> ssl.SSLContext:
    return tls.build_context(s, s.files())


def error_of(s: TlsSettings) -> str:
    with pytest.raises(TlsError) as info:
        build(s)
    message = str(info.value)
    assert "\n" not in message
    return message


# ---------------------------------------------------------------- settings
def test_no_certfile_means_plain_http():
    assert TlsSettings.from_settings({"certfile": None, "keyfile": None}) is None
    assert TlsSettings.from_settings({}) is None


def test_settings_read_with_their_defaults(pki):
    s = settings(pki)
    assert s.verify is ClientVerify.NONE
    assert s.minimum_version == "TLSv1.2"
    assert s.ciphers is None and s.ca_certs is None
    assert s.files() == {"certfile": str(pki / "server.pem"), "keyfile": str(pki / "server.key")}


# ---------------------------------------------------------------- the context
def test_context_speaks_http11_tls12_up_without_compression_or_renegotiation(pki):
    ctx = build(settings(pki))
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    assert ctx.verify_mode == ssl.CERT_NONE
    for option in (ssl.OP_NO_COMPRESSION, ssl.OP_NO_RENEGOTIATION,
                   ssl.OP_CIPHER_SERVER_PREFERENCE):
        assert ctx.options & option
    assert tls.ALPN == ["http/1.1"]


def test_minimum_version_and_ciphers(pki):
    ctx = build(settings(pki, ssl_minimum_version="TLSv1.3", ssl_ciphers="ECDHE+AESGCM"))
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_3
    tls12 = {c["name"] for c in ctx.get_ciphers() if c["protocol"] == "TLSv1.2"}
    assert tls12 and all("GCM" in name and "ECDHE" in name for name in tls12)


@pytest.mark.parametrize("mode, expected", [("none", ssl.CERT_NONE),
                                            ("optional", ssl.CERT_OPTIONAL),
                                            ("required", ssl.CERT_REQUIRED)])
def test_client_verification_modes(pki, mode, expected):
    ctx = build(settings(pki, ca_certs=str(pki / "ca.pem"), ssl_client_verify=mode))
    assert ctx.verify_mode == expected
    assert ctx.cert_store_stats()["x509_ca"] == 1


def test_key_inside_certfile(pki):
    build(settings(pki, certfile="combined.pem", keyfile=None))


# ---------------------------------------------------------------- one-line errors
def test_mismatched_key_names_certfile_and_keyfile(pki):
    assert error_of(settings(pki, keyfile="other.key")) == (
        f"certfile {pki}/server.pem: the key (keyfile {pki}/other.key) does not match the "
        f"certificate")


def test_key_of_another_type_is_a_mismatch_too(pki):
    assert "does not match the certificate" in error_of(settings(pki, keyfile="rsa.key"))


def test_certfile_without_its_key_names_certfile(pki):
    assert error_of(settings(pki, keyfile=None)) == (
        f"certfile {pki}/server.pem: no PEM private key in it")


def test_junk_certificate_is_named_not_the_key(pki):
    assert error_of(settings(pki, certfile="junk.pem")) == (
        f"certfile {pki}/junk.pem: no PEM certificate in it")


def test_junk_key(pki):
    assert error_of(settings(pki, keyfile="junk.pem")) == (
        f"keyfile {pki}/junk.pem: no PEM private key in it")


def test_encrypted_key_is_refused_without_a_prompt(pki):
    assert error_of(settings(pki, keyfile="encrypted.key")).startswith(
        f"keyfile {pki}/encrypted.key: the key is encrypted with a passphrase")


def test_missing_files(pki):
    assert error_of(settings(pki, certfile="nope.pem")) == (
        f"certfile {pki}/nope.pem: No such file or directory")
    assert error_of(settings(pki, keyfile="nope.key")) == (
        f"keyfile {pki}/nope.key: No such file or directory")


def test_bad_ca_certs(pki):
    assert error_of(settings(pki, ca_certs=str(pki / "junk.pem"),
                             ssl_client_verify="required")) == (
        f"ca_certs {pki}/junk.pem: no PEM certificate in it")


def test_bad_cipher_string_names_the_setting_and_value(pki):
    assert error_of(settings(pki, ssl_ciphers="NO-SUCH-CIPHER")).startswith(
        "ssl_ciphers 'NO-SUCH-CIPHER': OpenSSL selects no cipher with it")


# ---------------------------------------------------------------- master -> worker
def test_sealed_file_is_readable_through_proc_and_cannot_change():
    fd = tls.seal("certfile", b"PEM bytes")
    try:
        with open(f"/proc/self/fd/{fd}", "rb") as fh:
            assert fh.read() == b"PEM bytes"
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
        assert seals & fcntl.F_SEAL_WRITE and seals & fcntl.F_SEAL_SEAL
        with pytest.raises(PermissionError):
            os.pwrite(fd, b"x", 0)
        with pytest.raises(PermissionError):
            os.ftruncate(fd, 0)
        assert not os.get_inheritable(fd)
    finally:
        os.close(fd)


def test_check_loads_from_sealed_copies(pki):
    tls.check(settings(pki, ca_certs=str(pki / "ca.pem"), ssl_client_verify="optional"))
    with pytest.raises(TlsError, match="does not match"):
        tls.check(settings(pki, keyfile="other.key"))


def test_read_files_names_an_unreadable_file(pki):
    with pytest.raises(TlsError) as info:
        tls.read_files(settings(pki, keyfile="absent.key"))
    assert str(info.value).startswith(f"keyfile {pki}/absent.key does not exist")


# The master reads these files as root and hands their content to workers,
# which run application code: nobody but root (or the master's uid) may
# choose what is read.

def test_a_certbot_style_symlink_under_root_only_directories_is_followed(pki, tmp_path):
    live = tmp_path / "live"
    live.mkdir(mode=0o755)
    (live / "fullchain.pem").symlink_to(os.path.join(pki, "server.pem"))
    contents = tls.read_files(settings(pki, certfile=str(live / "fullchain.pem")))
    with open(os.path.join(pki, "server.pem"), "rb") as f:
        assert contents["certfile"] == f.read()


def test_a_symlink_in_a_directory_others_can_write_is_refused(pki, tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)                      # not sticky: anyone may swap its entries
    (shared / "cert.pem").symlink_to("/etc/shadow")
    with pytest.raises(TlsError) as info:
        tls.read_files(settings(pki, certfile=str(shared / "cert.pem")))
    assert "writable by group or others" in str(info.value)


def test_a_file_others_can_write_is_refused(pki, tmp_path):
    cert = tmp_path / "cert.pem"
    with open(os.path.join(pki, "server.pem"), "rb") as f:
        cert.write_bytes(f.read())
    os.chmod(cert, 0o666)
    with pytest.raises(TlsError) as info:
        tls.read_files(settings(pki, certfile=str(cert)))
    assert "chmod go-w" in str(info.value)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give a file to another uid")
def test_a_file_of_another_user_is_refused(pki, tmp_path):
    cert = tmp_path / "cert.pem"
    with open(os.path.join(pki, "server.pem"), "rb") as f:
        cert.write_bytes(f.read())
    os.chown(cert, 65534, 65534)
    with pytest.raises(TlsError) as info:
        tls.read_files(settings(pki, certfile=str(cert)))
    assert "owned by uid 65534" in str(info.value)


def test_worker_context_loads_and_closes_the_passed_descriptors(pki):
    s = settings(pki)
    fds = tls.seal_all(tls.read_files(s))
    spec = {"certfile": s.certfile, "keyfile": s.keyfile, "tls_fds": fds}
    ctx = tls.worker_context(spec)
    assert isinstance(ctx, ssl.SSLContext)
    for fd in fds.values():
        with pytest.raises(OSError) as info:
            os.fstat(fd)
        assert info.value.errno == errno.EBADF


def test_worker_context_reports_what_the_master_could_not_read(pki):
    spec = {"certfile": str(pki / "server.pem"), "tls_error": "certfile /x.pem: Permission denied"}
    with pytest.raises(TlsError, match=r"^certfile /x.pem: Permission denied$"):
        tls.worker_context(spec)


def test_worker_context_without_tls():
    assert tls.worker_context({"certfile": None}) is None


# ---------------------------------------------------------------- connections
class FakeSSLError(OSError):
    def __init__(self, reason):
        super().__init__(1, "ssl")
        self.reason = reason


@pytest.mark.parametrize("exc, timed_out, expected", [
    (FakeSSLError("HTTP_REQUEST"), False, ("plain HTTP on the TLS port", "")),
    (FakeSSLError("WRONG_VERSION_NUMBER"), False, ("TLS handshake failed", "wrong version number")),
    (FakeSSLError("PEER_DID_NOT_RETURN_A_CERTIFICATE"), False,
     ("TLS handshake failed", "peer did not return a certificate")),
    (ConnectionResetError(errno.ECONNRESET, "Connection reset by peer"), False,
     ("TLS handshake failed", "Connection reset by peer")),
    (OSError(errno.EBADF, "cancelled"), True, ("TLS handshake timeout", "")),
])
def test_handshake_failures_are_client_error_kinds(exc, timed_out, expected):
    assert tls.handshake_failure(exc, timed_out) == expected


def test_plain_http_detection():
    assert tls.is_plain_http(FakeSSLError("HTTP_REQUEST"))
    assert tls.is_plain_http(FakeSSLError("HTTPS_PROXY_REQUEST"))
    assert not tls.is_plain_http(FakeSSLError("WRONG_VERSION_NUMBER"))
    assert not tls.is_plain_http(ConnectionResetError())


def test_subject_dn_is_rfc4514():
    cert = {"subject": ((("countryName", "FR"),), (("organizationName", "Acme, Inc."),),
                        (("commonName", "alice"), ("userId", "42")))}
    assert tls.subject_dn(cert) == "CN=alice+UID=42,O=Acme\\, Inc.,C=FR"
    assert tls.subject_dn({"subject": ((("commonName", " #x "),),)}) == "CN=\\ #x\\ "
    assert tls.subject_dn({}) is None
    assert tls.subject_dn(None) is None
