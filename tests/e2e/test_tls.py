"""End-to-end: TLS in the workers (issue 11).

The real `ipserve` command (nft router, 4 workers) serves HTTPS and wss in the
testbed's server namespace with certificates made here by the `openssl`
command; clients in the client namespace (198.18.0.16-31: the low 2 bits pick
the slot) use Python's ssl, `curl --cacert` and websocket-client over TLS
sockets. Asserted: each address always lands on its slot's worker, the
environ says https, ALPN is http/1.1, a client that sends plain HTTP or never
finishes its handshake is cut off without costing the worker anything, a HUP
after the files changed serves the new certificate while old connections
keep theirs, and broken files are refused in one line (at start) or fail the
reload (on HUP). Waits are bounded polls; no durations are compared.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import ssl
import subprocess
import tempfile
import textwrap

import netns
import pytest
from backends import routed_workers, slot_of, which
from netns import Bg, tcp_connect

PORT = 8443
WORKERS = 4
HOST = "localhost"          # the name in the server certificates

pytestmark = [pytest.mark.skipif(not which("nft"), reason="nft is not installed"),
              pytest.mark.skipif(not which("openssl"), reason="openssl is not installed")]

APP = textwrap.dedent('''
    import json
    import os

    def application(environ, start_response):
        ws = environ.get("wsgi.websocket")
        if ws is not None:
            while True:
                message = ws.receive()
                if message is None:
                    return []
                ws.send(message)
        body = json.dumps({
            "pid": os.getpid(), "scheme": environ["wsgi.url_scheme"],
            "https": environ.get("HTTPS"), "dn": environ.get("SSL_CLIENT_S_DN"),
            "remote_addr": environ["REMOTE_ADDR"]}).encode()
        start_response("200 OK", [("Content-Type", "application/json"),
                                  ("Content-Length", str(len(body)))])
        return [body]
''')


# --------------------------------------------------------------------------- #
# Certificates
# --------------------------------------------------------------------------- #

def openssl(*args: str, cwd: str) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


class Pki:
    """A CA; server certificates A and B for `localhost` (two serials); a key
    that matches neither; a client certificate signed by the CA."""

    def __init__(self, directory: str):
        self.dir = directory
        ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
        openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
                "-subj", "/CN=ipserve test CA", cwd=directory)
        with open(self.path("san.cnf"), "w") as fh:
            fh.write(f"subjectAltName=DNS:{HOST}\n")
        with open(self.path("client.cnf"), "w") as fh:
            fh.write("extendedKeyUsage=clientAuth\n")
        for name, cnf in (("a", "san.cnf"), ("b", "san.cnf"), ("client", "client.cnf")):
            subject = "/O=ipserve tests/CN=client-1" if name == "client" else f"/CN={HOST}"
            openssl("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr",
                    "-subj", subject, cwd=directory)
            openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                    "-CAcreateserial", "-out", f"{name}.pem", "-days", "2", "-extfile", cnf,
                    cwd=directory)
        openssl("genpkey", "-algorithm", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                "-out", "stray.key", cwd=directory)

    def path(self, name: str) -> str:
        return os.path.join(self.dir, name)

    def der(self, name: str) -> bytes:
        with open(self.path(name)) as fh:
            return ssl.PEM_cert_to_DER_cert(fh.read())


@pytest.fixture(scope="module")
def pki():
    directory = tempfile.mkdtemp(prefix="ips-pki-")
    try:
        yield Pki(directory)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def site(testbed, pki):
    """The app and a `live` directory like certbot's: cert.pem and key.pem
    (the key 0600, root's), holding certificate A."""
    directory = tempfile.mkdtemp(prefix="ips-tls-")
    testbed.add_path(directory)
    os.chmod(directory, 0o755)
    with open(os.path.join(directory, "tls_app.py"), "w") as fh:
        fh.write(APP)
    os.chmod(os.path.join(directory, "tls_app.py"), 0o644)
    install(pki, directory, "a")
    return directory


def install(pki: Pki, directory: str, name: str, key: str | None = None) -> None:
    """Certificate `name` (and its key, or `key`) into directory/cert.pem,
    key.pem: written aside and renamed in, as certbot does."""
    for source, target, mode in ((f"{name}.pem", "cert.pem", 0o644),
                                 (key or f"{name}.key", "key.pem", 0o600)):
        tmp = os.path.join(directory, target + ".new")
        shutil.copyfile(pki.path(source), tmp)
        os.chmod(tmp, mode)
        os.replace(tmp, os.path.join(directory, target))


def serve(ipserve, site: str, extra=(), workers: int = WORKERS, **kwargs):
    args = [os.path.join(site, "tls_app.py") + ":application", "-w", str(workers),
            "--router", "nft", "-b", f"0.0.0.0:{PORT}", "--graceful-timeout", "5",
            "--certfile", os.path.join(site, "cert.pem"),
            "--keyfile", os.path.join(site, "key.pem"), *map(str, extra)]
    srv = ipserve(args, **kwargs)
    return srv, wait_routed(srv, workers)


def wait_routed(srv, workers: int = WORKERS, generation: int | None = None) -> dict[int, dict]:
    st = srv.wait_for(lambda st: routed_workers(st, workers, generation) is not None,
                      timeout=30, interval=0.05, what=f"{workers} workers routed")
    return routed_workers(st, workers, generation)


def wait_reload(srv, generation: int, state: str) -> dict:
    def ok(st):
        r = st.get("reload") or {}
        return r.get("generation") == generation and r.get("state") == state
    return srv.wait_for(ok, timeout=30, what=f"reload to generation {generation}: {state}")


# --------------------------------------------------------------------------- #
# Clients
# --------------------------------------------------------------------------- #

def client_context(pki: Pki, cert: str | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=pki.path("ca.pem"))
    ctx.set_alpn_protocols(["h2", "http/1.1"])
    if cert is not None:
        ctx.load_cert_chain(pki.path(f"{cert}.pem"), pki.path(f"{cert}.key"))
    return ctx


def tls_connect(tb, src: str, ctx: ssl.SSLContext) -> ssl.SSLSocket:
    sock = tcp_connect(tb.client_ns, src, tb.server_ip, PORT, timeout=10)
    try:
        return ctx.wrap_socket(sock, server_hostname=HOST)
    except BaseException:
        sock.close()
        raise


def read_response(tls_sock: ssl.SSLSocket) -> tuple[int, dict, bytes]:
    """One response with a Content-Length (our app's and ipserve's own)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = tls_sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed before a whole head: {data!r}")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:])}
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = tls_sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed inside a body")
        body += chunk
    return int(lines[0].split()[1]), headers, body


def request(tls_sock: ssl.SSLSocket, path: str = "/", close: bool = False) -> dict:
    tls_sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {HOST}\r\n"
                     f"{'Connection: close' if close else ''}\r\n\r\n".encode())
    status, _, body = read_response(tls_sock)
    assert status == 200, (status, body)
    return json.loads(body)


def https_get(tb, src: str, ctx: ssl.SSLContext) -> dict:
    """One request on a fresh TLS connection: the app's reply, with the ALPN
    protocol (_alpn) and the server's certificate (_cert, DER) it saw."""
    with tls_connect(tb, src, ctx) as sock:
        reply = request(sock, close=True)
        reply["_alpn"] = sock.selected_alpn_protocol()
        reply["_cert"] = sock.getpeercert(binary_form=True)
    return reply


def curl(tb, src: str, pki: Pki) -> dict:
    proc = tb.call_in(tb.client_ns, [
        "curl", "-sS", "--max-time", "10", "--cacert", pki.path("ca.pem"), "--interface", src,
        "--resolve", f"{HOST}:{PORT}:{tb.server_ip}", f"https://{HOST}:{PORT}/"])
    return json.loads(proc.stdout)


def expected_pids(tb, table: dict[int, dict]) -> dict[str, int]:
    return {src: table[slot_of(src, WORKERS)]["pid"] for src in tb.client_ips}


def assert_no_traceback(srv) -> None:
    assert "Traceback" not in srv.log_text(), srv.log_tail(80)


# --------------------------------------------------------------------------- #
# Tests
# --------------------------------------------------------------------------- #

def test_https_from_16_addresses_pinned_with_python_and_curl(testbed, ipserve, pki, site):
    tb = testbed
    srv, table = serve(ipserve, site)
    want = expected_pids(tb, table)
    assert len(tb.client_ips) == 16 and len(set(want.values())) == WORKERS
    ctx = client_context(pki)
    for src in tb.client_ips:
        for _ in range(2):
            reply = https_get(tb, src, ctx)
            assert reply["pid"] == want[src], (src, reply)
            assert reply["remote_addr"] == src
            assert (reply["scheme"], reply["https"]) == ("https", "on")
            assert reply["_alpn"] == "http/1.1"          # offered h2 first: not taken
            assert reply["_cert"] == pki.der("a.pem")
        assert curl(tb, src, pki)["pid"] == want[src], src
    # Keep-alive over TLS: one connection, several requests, one worker.
    with tls_connect(tb, tb.client_ips[5], ctx) as sock:
        assert {request(sock)["pid"] for _ in range(5)} == {want[tb.client_ips[5]]}
    assert {w["pid"] for w in wait_routed(srv).values()} == set(want.values())
    assert_no_traceback(srv)


def test_wss_echo_pinned(testbed, ipserve, pki, site):
    import websocket  # websocket-client

    tb = testbed
    srv, table = serve(ipserve, site)
    want = expected_pids(tb, table)
    ctx = client_context(pki)
    for src in tb.client_ips[:8]:
        ws = websocket.create_connection(f"wss://{HOST}:{PORT}/ws", socket=tls_connect(tb, src, ctx),
                                         timeout=10)
        try:
            for i in range(3):
                text = f"hello {src} #{i}"
                ws.send(text)
                assert ws.recv() == text
            ws.send_binary(os.urandom(70000) + b"end")
            assert ws.recv().endswith(b"end")
        finally:
            ws.close()
        assert https_get(tb, src, ctx)["pid"] == want[src]
    assert_no_traceback(srv)


def test_plain_http_garbage_and_stalled_handshakes_are_cut_off(testbed, ipserve, pki, site):
    tb = testbed
    srv, table = serve(ipserve, site, extra=["--header-timeout", "2"])
    src = tb.client_ips[3]
    pid = table[slot_of(src, WORKERS)]["pid"]

    # Plain HTTP: answered 400 in plain text, then closed.
    with tcp_connect(tb.client_ns, src, tb.server_ip, PORT, timeout=10) as sock:
        sock.sendall(f"GET / HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode())
        answer = b""
        while chunk := sock.recv(4096):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 400 "), answer
    assert b"HTTPS port" in answer

    def cut_off(payload: bytes) -> bool:
        """True when the server ends the connection (EOF or reset) within 30 s."""
        with tcp_connect(tb.client_ns, src, tb.server_ip, PORT, timeout=30) as sock:
            if payload:
                sock.sendall(payload)
            try:
                while sock.recv(4096):
                    pass
            except ConnectionResetError:
                pass
            except TimeoutError:
                return False
            return True

    stalls = [Bg(lambda: cut_off(b"")),                       # connects, says nothing
              Bg(lambda: cut_off(bytes.fromhex("16030100c8010000c40303"))),  # half a ClientHello
              Bg(lambda: cut_off(os.urandom(64)))]             # garbage
    assert [b.value(timeout=60) for b in stalls] == [True, True, True]

    srv.wait_log(r"client error \(plain HTTP on the TLS port\)")
    srv.wait_log(r"client error \(TLS handshake timeout\)")
    srv.wait_log(r"client error \(TLS handshake failed\)")
    # The worker lost nothing: same process, still serving TLS.
    assert https_get(tb, src, client_context(pki))["pid"] == pid
    assert wait_routed(srv)[slot_of(src, WORKERS)]["pid"] == pid
    assert_no_traceback(srv)


def test_hup_after_renewal_serves_the_new_certificate(testbed, ipserve, pki, site):
    tb = testbed
    srv, table = serve(ipserve, site)
    ctx = client_context(pki)
    src = tb.client_ips[6]
    old = tls_connect(tb, src, ctx)
    try:
        assert old.getpeercert(binary_form=True) == pki.der("a.pem")
        old_pid = request(old)["pid"]
        assert old_pid == table[slot_of(src, WORKERS)]["pid"]

        install(pki, site, "b")           # certbot renewed
        srv.send_signal(signal.SIGHUP)
        wait_reload(srv, generation=2, state="done")
        new_table = wait_routed(srv, generation=2)
        for address in tb.client_ips[:8]:
            reply = https_get(tb, address, ctx)
            assert reply["_cert"] == pki.der("b.pem"), address
            assert reply["pid"] == new_table[slot_of(address, WORKERS)]["pid"]
        # The connection opened before the HUP keeps its worker and certificate.
        assert request(old)["pid"] == old_pid
        assert old.getpeercert(binary_form=True) == pki.der("a.pem")
    finally:
        old.close()
    assert_no_traceback(srv)


def test_broken_certificate_on_hup_fails_the_reload(testbed, ipserve, pki, site):
    tb = testbed
    srv, table = serve(ipserve, site)
    install(pki, site, "a", key="stray.key")          # a renewal gone wrong
    srv.send_signal(signal.SIGHUP)
    st = wait_reload(srv, generation=2, state="failed")
    error = st["reload"]["error"] or ""
    assert "does not match the certificate" in error and "cert.pem" in error, st["reload"]
    same = wait_routed(srv, generation=1)
    assert {s: w["pid"] for s, w in same.items()} == {s: w["pid"] for s, w in table.items()}
    ctx = client_context(pki)
    for src in tb.client_ips[:4]:
        reply = https_get(tb, src, ctx)
        assert reply["pid"] == table[slot_of(src, WORKERS)]["pid"]
        assert reply["_cert"] == pki.der("a.pem")
    assert srv.running()
    assert_no_traceback(srv)


@pytest.mark.parametrize("case", ["mismatched key", "bad ciphers", "missing key"])
def test_bad_files_refused_at_start_in_one_line(testbed, ipserve, pki, site, case):
    extra = {"mismatched key": [],
             "bad ciphers": ["--ssl-ciphers", "NO-SUCH-CIPHER"],
             "missing key": []}[case]
    if case == "mismatched key":
        install(pki, site, "a", key="stray.key")
    if case == "missing key":
        os.unlink(os.path.join(site, "key.pem"))
    srv = ipserve([os.path.join(site, "tls_app.py") + ":application", "-w", str(WORKERS),
                   "--router", "nft", "-b", f"0.0.0.0:{PORT}",
                   "--certfile", os.path.join(site, "cert.pem"),
                   "--keyfile", os.path.join(site, "key.pem"), *extra])
    assert srv.proc.wait(60) == 2
    lines = srv.own_lines()
    assert len(lines) == 1, lines
    expected = {"mismatched key": f"certfile {site}/cert.pem: the key (keyfile {site}/key.pem) "
                                  f"does not match the certificate",
                "bad ciphers": "ssl_ciphers 'NO-SUCH-CIPHER'",
                "missing key": f"keyfile {site}/key.pem does not exist"}[case]
    assert expected in lines[0], lines
    # Nothing started: no rules, no workers.
    assert not srv.seen_worker_pids
    rules = testbed.call_in(testbed.server_ns, ["nft", "list", "tables"]).stdout
    assert f"ipserve_{srv.name}" not in rules


def test_client_certificates_required(testbed, ipserve, pki, site):
    tb = testbed
    srv, table = serve(ipserve, site, extra=["--ca-certs", pki.path("ca.pem"),
                                             "--ssl-client-verify", "required"])
    src = tb.client_ips[2]
    # No certificate: the handshake fails (with TLS 1.3 the client may only
    # learn it at its first read), and no response ever comes.
    with pytest.raises((ssl.SSLError, ConnectionError)), \
            tls_connect(tb, src, client_context(pki)) as sock:
        request(sock, close=True)
    reply = https_get(tb, src, client_context(pki, cert="client"))
    assert reply["pid"] == table[slot_of(src, WORKERS)]["pid"]
    assert reply["dn"] == "CN=client-1,O=ipserve tests"
    srv.wait_log(r"client error \(TLS handshake failed\).*certificate")
    assert_no_traceback(srv)


def test_root_only_key_served_by_workers_running_as_nobody(testbed, ipserve, pki, site):
    """The master reads the 0600 key as root and hands each worker a sealed
    copy: the workers, as nobody, could not open the file themselves."""
    nobody = 65534
    readable = subprocess.run([netns.SETPRIV, f"--reuid={nobody}",
                               f"--regid={netns._primary_gid(nobody)}", "--clear-groups",
                               "test", "-r", os.path.join(netns.REPO_ROOT, "ipserve", "worker",
                                                          "main.py")], check=False, capture_output=True)
    if readable.returncode != 0:
        pytest.skip("the ipserve package is not readable by nobody here")
    runtime = os.path.join(site, "run")
    os.mkdir(runtime, 0o755)
    srv, table = serve(ipserve, site, extra=["--user", "nobody"], runtime_dir=runtime)
    assert os.stat(os.path.join(site, "key.pem")).st_mode & 0o777 == 0o600
    for w in table.values():
        with open(f"/proc/{w['pid']}/status") as fh:
            uid = next(line for line in fh if line.startswith("Uid:")).split()[1]
        assert int(uid) == nobody
        # The key's descriptor was closed once loaded.
        fds = [os.readlink(f"/proc/{w['pid']}/fd/{fd}") for fd in os.listdir(f"/proc/{w['pid']}/fd")]
        assert not [f for f in fds if f.startswith("/memfd:ipserve-")], fds
    ctx = client_context(pki)
    for src in testbed.client_ips[:4]:
        assert https_get(testbed, src, ctx)["pid"] == table[slot_of(src, WORKERS)]["pid"]
    assert_no_traceback(srv)
