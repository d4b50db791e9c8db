"""The stack's TLS material, made with openssl.

* ``DIR/tls/ca.pem`` and ``ca-key.pem``: the stack's own CA (the key never
  leaves ``DIR/tls``);
* ``DIR/tls/server-cert.pem`` / ``server-key.pem``: for the name scopers'
  listeners on 127.0.0.1 (SAN ``IP:127.0.0.1``, ``DNS:localhost``);
* ``DIR/certs`` (``DOCKER_CERT_PATH``): ``ca.pem`` plus a client
  ``cert.pem``/``key.pem`` signed by the CA, because docker-py and
  docker-compose refuse ``DOCKER_TLS_VERIFY`` without a client pair.

EC P-256 keys: quick to make, understood by Go, OpenSSL and Python clients.
"""

from __future__ import annotations

import os
from pathlib import Path

from ._procs import Commands
from ._state import Layout

OPENSSL = "/usr/bin/openssl"
DAYS = "825"  # the longest validity clients accept for a server certificate
COMPONENT = "tls"

_EXTENSIONS = {
    "server": (
        "basicConstraints = critical, CA:FALSE\n"
        "keyUsage = critical, digitalSignature\n"
        "extendedKeyUsage = serverAuth\n"
        "subjectAltName = IP:127.0.0.1, DNS:localhost\n"
    ),
    "client": (
        "basicConstraints = critical, CA:FALSE\n"
        "keyUsage = critical, digitalSignature\n"
        "extendedKeyUsage = clientAuth\n"
    ),
}


def files(layout: Layout) -> dict[str, Path]:
    t, c = layout.tls, layout.certs
    return {
        "ca": t / "ca.pem",
        "ca_key": t / "ca-key.pem",
        "server_cert": t / "server-cert.pem",
        "server_key": t / "server-key.pem",
        "client_ca": c / "ca.pem",
        "client_cert": c / "cert.pem",
        "client_key": c / "key.pem",
    }


def _copy(src: Path, dst: Path, mode: int) -> None:
    fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as out:
        out.write(src.read_bytes())
    os.chmod(dst, mode)


def ensure(layout: Layout, cmds: Commands) -> bool:
    """Make the material unless all of it exists (then nothing changes);
    True if it was made.

    Keys are written inside ``DIR/tls`` (mode 0700: not even briefly
    readable by others), made 0600, and the client pair is then copied to
    ``DIR/certs``.  No umask games: ``up`` runs other steps in threads.
    """
    f = files(layout)
    if all(p.exists() for p in f.values()):
        return False
    t = layout.tls
    t.mkdir(mode=0o700, exist_ok=True)
    layout.certs.mkdir(mode=0o755, exist_ok=True)
    t.chmod(0o700)
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    cmds.run(COMPONENT, [
        OPENSSL, "req", "-x509", "-new", *ec, "-keyout", f["ca_key"], "-out", f["ca"], "-days", DAYS,
        "-subj", f"/O=FDCS devstack/CN=FDCS devstack CA {layout.stack_id}",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
    ])
    for kind, cn in (("server", "localhost"), ("client", "fdcs-devstack-client")):
        key, csr, ext, cert = (t / f"{kind}-{n}" for n in ("key.pem", "csr.pem", "ext.cnf", "cert.pem"))
        ext.write_text(_EXTENSIONS[kind])
        cmds.run(COMPONENT, [
            OPENSSL, "req", "-new", *ec, "-keyout", key, "-out", csr, "-subj", f"/O=FDCS devstack/CN={cn}",
        ])
        cmds.run(COMPONENT, [
            OPENSSL, "x509", "-req", "-in", csr, "-CA", f["ca"], "-CAkey", f["ca_key"],
            "-CAcreateserial", "-days", DAYS, "-extfile", ext, "-out", cert,
        ])
        csr.unlink()
        ext.unlink()
    for key in t.glob("*key.pem"):
        key.chmod(0o600)
    _copy(f["ca"], f["client_ca"], 0o644)
    _copy(t / "client-cert.pem", f["client_cert"], 0o644)
    _copy(t / "client-key.pem", f["client_key"], 0o600)
    return True
