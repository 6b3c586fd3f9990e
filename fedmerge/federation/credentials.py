"""Transport credentials for Flower: a TLS CA and server certificate, and SuperNode auth keys.

These are separate from the institution identities of ``fedmerge.security`` on purpose: TLS and
SuperNode keys decide who may *connect*; the Ed25519 identities decide whose *contribution*
counts. A consortium with its own PKI uses its own certificates; these helpers are for standing
one up quickly (and for the tests), written with ``cryptography``, private keys mode 0600.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from fedmerge.checkpoints.atomic import write_private_atomic
from fedmerge.federation.errors import WritableByOthers


@dataclass(frozen=True)
class TlsFiles:
    ca_cert: Path
    server_cert: Path
    server_key: Path


LOOPBACK = "127.0.0.1"


def make_tls(out_dir: str | os.PathLike[str], hosts: list[str], days: int = 365) -> TlsFiles:
    """A self-signed CA and a server certificate for ``hosts`` (names or IP addresses) and 127.0.0.1, signed by it.

    The coordinator reaches its own SuperLink's Control and runtime APIs on 127.0.0.1 with the
    same certificate, so the loopback address is always in it.
    """
    hosts = list(dict.fromkeys([*hosts, LOOPBACK]))
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=5)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedmerge consortium CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = []
    for h in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            sans.append(x509.DNSName(h))
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    files = TlsFiles(out / "ca.pem", out / "server.pem", out / "server.key")
    files.ca_cert.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    files.server_cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    write_private_atomic(
        files.server_key,
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
    )
    write_private_atomic(
        out / "ca.key",
        ca_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
    )
    return files


def certificate_hosts(cert_file: str | os.PathLike[str]) -> list[str]:
    """The names and IP addresses a PEM certificate is valid for (its subject alternative names)."""
    from cryptography import x509

    cert = x509.load_pem_x509_certificate(Path(cert_file).read_bytes())
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] + list(sans.get_values_for_type(x509.DNSName))


def make_node_key(out_dir: str | os.PathLike[str], name: str) -> tuple[Path, Path]:
    """A SuperNode authentication key pair (EC P-384, OpenSSH format, as Flower expects)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    out = Path(out_dir)
    key = ec.generate_private_key(ec.SECP384R1())
    priv, pub = out / f"{name}.node", out / f"{name}.node.pub"
    write_private_atomic(priv, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()))
    pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH) + b"\n")
    return priv, pub


def require_owner_only_writable(path: str | os.PathLike[str], what: str) -> None:
    """``WritableByOthers`` unless ``path``, and the folder it is in, can be changed only by this user (or root).

    The pinned coordinator key, the trust store, the node keys bound to institutions and the
    configs naming them decide whom a daemon trusts: whoever can rewrite one of them (or rename
    another file over it) could re-pin the coordinator, roll the trust store back to a version
    signed before a revocation, or bind their own node to an institution. Signatures do not help
    there; file ownership does, as ssh requires of ``authorized_keys``.
    """
    import stat

    target = Path(path).resolve()
    allowed = {os.getuid(), 0}
    for p, is_dir in ((target, False), (target.parent, True)):
        st = os.stat(p)
        if st.st_uid not in allowed:
            raise WritableByOthers(f"{what}: {p} belongs to uid {st.st_uid}, not to this user ({os.getuid()}) or root; it decides whom this daemon trusts")
        # A shared folder with the sticky bit (like /tmp) lets nobody rename another user's file.
        if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not (is_dir and st.st_mode & stat.S_ISVTX):
            raise WritableByOthers(
                f"{what}: {p} is writable by {'every user' if st.st_mode & stat.S_IWOTH else 'its group'} (mode {stat.S_IMODE(st.st_mode):04o}); "
                f"it decides whom this daemon trusts: chmod go-w {p}"
            )
