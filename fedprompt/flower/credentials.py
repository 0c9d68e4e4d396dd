"""Credentials for a Flower deployment over TLS with SuperNode authentication.

::

    python -m fedprompt.flower.credentials OUT_DIR --nodes N [--host NAME_OR_IP ...] [--days DAYS] [--overwrite]

writes, with the ``cryptography`` package alone (no ``openssl``), the files Flower 1.42 reads:

* ``ca.pem``: a self-signed certificate authority (ECDSA P-384). Everyone who connects to the
  SuperLink verifies it against this root: ``flower-superlink --ssl-ca-certfile``,
  ``flower-supernode --root-certificates`` and ``root-certificates`` in the ``flwr`` CLI's
  connection (``$FLWR_HOME/config.toml``).
* ``ca.key``: the authority's private key (mode 0600); nothing in a deployment reads it. Keep
  it off the SuperLink's machine: whoever holds it can issue certificates this root vouches for.
* ``superlink.pem`` and ``superlink.key`` (mode 0600): the SuperLink's TLS certificate, signed
  by the authority and valid for ``localhost``, ``127.0.0.1`` and every ``--host`` (its subject
  alternative names), and its private key: ``--ssl-certfile`` and ``--ssl-keyfile``.
* ``node-<i>.key`` (mode 0600) and ``node-<i>.pub`` for i in 0..N-1: SuperNode i's
  authentication key pair, ECDSA on the NIST curve P-384, the private key in the OpenSSH
  private-key format (``flower-supernode --auth-supernode-private-key``), the public key in the
  OpenSSH public-key format (``flwr supernode register node-<i>.pub``, which answers with the
  node id the SuperLink gives that key).
* ``client-keys.txt``: one line, ``0=SHA256:...,1=SHA256:...``: the ServerApp's ``client-keys``
  run-config setting (:func:`fedprompt.flower.common.parse_client_keys`) that binds client i to
  the node holding ``node-<i>.key``. A fingerprint is :func:`key_fingerprint` of the public
  key, the one ``ssh-keygen -l -f node-<i>.pub`` prints.

Private keys are created with mode 0600 (never readable by others, not even for an instant)
and are not encrypted: Flower reads them without a passphrase. OUT_DIR is created if needed; a
directory that already holds files is refused unless ``--overwrite`` is given, which replaces
the files of the names above and leaves any other file in place.

Errors are one line on stderr and exit status 2 for bad input (``N < 1``, a host that is neither
an IP address nor a DNS name, an OUT_DIR that is a file or holds files), 1 for an
operating-system error (a read-only folder).
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import datetime
import hashlib
import ipaddress
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedprompt.errors import ConfigError, run_command

CURVE = ec.SECP384R1
"""Every key's curve: NIST P-384 (``flwr supernode register`` accepts NIST EC curves only)."""

DEFAULT_HOSTS = ("localhost", "127.0.0.1")
"""The names the SuperLink's certificate is always valid for (a loopback deployment)."""

CLIENT_KEYS_FILE = "client-keys.txt"
"""The file holding the ``client-keys`` run-config value."""

_DNS_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")


@dataclasses.dataclass(frozen=True)
class Credentials:
    """The files :func:`write_credentials` wrote (paths inside its ``out_dir``)."""

    out_dir: Path
    ca_certificate: Path
    ca_key: Path
    superlink_certificate: Path
    superlink_key: Path
    node_keys: tuple[Path, ...]
    node_public_keys: tuple[Path, ...]
    client_keys: Path
    hosts: tuple[str, ...]

    @property
    def client_keys_value(self) -> str:
        """The ``client-keys`` run-config value: client i is the node holding ``node_keys[i]``."""
        return self.client_keys.read_text().strip()


def key_fingerprint(public_key: bytes | ec.EllipticCurvePublicKey) -> str:
    """A public key's SHA-256 fingerprint, ``SHA256:<base64 without padding>``: the hash of its
    OpenSSH wire encoding, as ``ssh-keygen -l`` prints it.

    ``public_key``: a key object, or its bytes in PEM (SubjectPublicKeyInfo, how the SuperLink
    reports a node's key to the ServerApp) or OpenSSH (``node-<i>.pub``) form.

    Raises:
      ConfigError: bytes that are neither, or a key that is not an elliptic-curve key.
    """
    if isinstance(public_key, bytes):
        try:
            if public_key.lstrip().startswith(b"-----BEGIN"):
                loaded = serialization.load_pem_public_key(public_key)
            else:
                loaded = serialization.load_ssh_public_key(public_key)
        except (ValueError, TypeError, UnsupportedAlgorithm) as err:
            raise ConfigError(f"not a PEM or OpenSSH public key: {err}") from err
    else:
        loaded = public_key
    if not isinstance(loaded, ec.EllipticCurvePublicKey):
        raise ConfigError(f"not an elliptic-curve public key: {type(loaded).__name__}")
    line = loaded.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    blob = base64.b64decode(line.split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode("ascii").rstrip("=")


def check_host(host: str) -> x509.GeneralName:
    """A ``--host`` as a subject alternative name: an IP address, or a DNS name (ASCII labels of
    letters, digits and inner hyphens).

    Raises:
      ConfigError: anything else (a URL, a host with a port, an empty name).
    """
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        pass
    name = host[:-1] if host.endswith(".") else host
    if not name or len(name) > 253 or not all(_DNS_LABEL.match(label) for label in name.split(".")):
        raise ConfigError(f"--host must be an IP address or a DNS name (no scheme, no port), got {host!r}")
    return x509.DNSName(name)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedprompt deployment"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _certificate(subject: x509.Name, key: ec.EllipticCurvePrivateKey, issuer: x509.Name,
                 issuer_key: ec.EllipticCurvePrivateKey, days: int, *, ca: bool,
                 names: Sequence[x509.GeneralName] = ()) -> x509.Certificate:
    """A certificate with the extensions strict X.509 verification asks for (key identifiers,
    critical basic constraints and key usage)."""
    now = datetime.datetime.now(datetime.timezone.utc)
    public = key.public_key()
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject).issuer_name(issuer).public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))  # a little clock skew between machines
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False, data_encipherment=False,
            key_agreement=False, key_cert_sign=ca, crl_sign=ca, encipher_only=False, decipher_only=False),
            critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), critical=False)
    )
    if not ca:
        builder = (builder
                   .add_extension(x509.SubjectAlternativeName(list(names)), critical=False)
                   .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False))
    return builder.sign(issuer_key, hashes.SHA384())


def _write(path: Path, data: bytes, *, private: bool) -> None:
    """Writes a file; a private one is created with mode 0600 (an existing file is replaced,
    never reused with its old mode)."""
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as file:
        file.write(data)
    if private:
        os.chmod(path, 0o600)  # whatever the umask


def _private_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def write_credentials(out_dir: str | os.PathLike[str], nodes: int, hosts: Sequence[str] = (), *,
                      days: int = 365, overwrite: bool = False) -> Credentials:
    """Writes a CA, the SuperLink's TLS certificate and key, and ``nodes`` SuperNode key pairs
    into ``out_dir`` (the files of this module's docstring).

    Raises:
      ConfigError: ``nodes < 1``, ``days < 1``, a bad host, an ``out_dir`` that is not a
        directory, or one that holds files without ``overwrite``.
    """
    if isinstance(nodes, bool) or not isinstance(nodes, int) or nodes < 1:
        raise ConfigError(f"--nodes must be an int >= 1, got {nodes!r}")
    if isinstance(days, bool) or not isinstance(days, int) or days < 1:
        raise ConfigError(f"--days must be an int >= 1, got {days!r}")
    all_hosts = tuple(dict.fromkeys([*DEFAULT_HOSTS, *hosts]))  # in order, each once
    names = [check_host(host) for host in all_hosts]
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out} is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"{out} already holds files: choose an empty directory, or pass --overwrite to replace "
                          "the credentials in it")
    out.mkdir(parents=True, exist_ok=True)

    ca_key = ec.generate_private_key(CURVE())
    ca_name = _name("fedprompt deployment CA")
    ca = _certificate(ca_name, ca_key, ca_name, ca_key, days, ca=True)
    server_key = ec.generate_private_key(CURVE())
    server = _certificate(_name("fedprompt SuperLink"), server_key, ca_name, ca_key, days, ca=False, names=names)

    paths = {name: out / name for name in ("ca.pem", "ca.key", "superlink.pem", "superlink.key")}
    _write(paths["ca.key"], _private_pem(ca_key), private=True)
    _write(paths["ca.pem"], ca.public_bytes(serialization.Encoding.PEM), private=False)
    _write(paths["superlink.key"], _private_pem(server_key), private=True)
    _write(paths["superlink.pem"], server.public_bytes(serialization.Encoding.PEM), private=False)
    private_paths, public_paths, bindings = [], [], []
    for i in range(nodes):
        key = ec.generate_private_key(CURVE())
        private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                    serialization.NoEncryption())
        public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        private_paths.append(out / f"node-{i}.key")
        public_paths.append(out / f"node-{i}.pub")
        _write(private_paths[-1], private, private=True)
        _write(public_paths[-1], public + f" fedprompt-node-{i}\n".encode("ascii"), private=False)
        bindings.append(f"{i}={key_fingerprint(key.public_key())}")
    client_keys = out / CLIENT_KEYS_FILE
    _write(client_keys, (",".join(bindings) + "\n").encode("ascii"), private=False)
    return Credentials(out, paths["ca.pem"], paths["ca.key"], paths["superlink.pem"], paths["superlink.key"],
                       tuple(private_paths), tuple(public_paths), client_keys, all_hosts)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m fedprompt.flower.credentials",
        description="Write a CA, the SuperLink's TLS certificate and key, and one authentication key pair per "
                    "SuperNode, for a Flower deployment with TLS and SuperNode authentication.")
    parser.add_argument("out_dir", metavar="OUT_DIR", help="where to write them (created if needed)")
    parser.add_argument("--nodes", type=int, required=True, metavar="N", help="SuperNode key pairs to write (>= 1)")
    parser.add_argument("--host", action="append", default=[], metavar="NAME_OR_IP",
                        help="another name the SuperLink is reached at (repeatable); localhost and 127.0.0.1 "
                             "are always in its certificate")
    parser.add_argument("--days", type=int, default=365, help="how long the certificates are valid (default 365)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the credentials in an OUT_DIR that already holds files")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """The command: writes the credentials and says what goes where. Returns the exit status
    (0; 2 for bad input; 1 for an operating-system error)."""
    args = build_parser().parse_args(argv)
    return run_command(lambda: _write_and_say(args))


def _write_and_say(args: argparse.Namespace) -> int:
    creds = write_credentials(args.out_dir, args.nodes, args.host, days=args.days, overwrite=args.overwrite)
    print(f"CA certificate:        {creds.ca_certificate}  (its key {creds.ca_key.name}: keep it offline)")
    print(f"SuperLink certificate: {creds.superlink_certificate}, key {creds.superlink_key.name}, valid for "
          f"{', '.join(creds.hosts)}")
    print(f"SuperNode keys:        node-0.key/.pub .. node-{len(creds.node_keys) - 1}.key/.pub")
    print(f"client-keys ({creds.client_keys.name}): {creds.client_keys_value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
