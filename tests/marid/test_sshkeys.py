import base64
import shutil
import subprocess
import warnings
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import serialization as ser
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa, x25519
from cryptography.x509.oid import NameOID

from marid.sshkeys import is_private_key

PEM = ser.Encoding.PEM
NONE = ser.NoEncryption()
PASSPHRASE = ser.BestAvailableEncryption(b"correct horse")

PrivateKey = (
    ed25519.Ed25519PrivateKey
    | ec.EllipticCurvePrivateKey
    | rsa.RSAPrivateKey
    | dsa.DSAPrivateKey
    | x25519.X25519PrivateKey
    | ed448.Ed448PrivateKey
)


def private_text(
    key: PrivateKey, fmt: ser.PrivateFormat, enc: ser.KeySerializationEncryption
) -> str:
    with warnings.catch_warnings():
        # Writing OpenSSH DSA keys is deprecated in cryptography; tests still need one.
        warnings.simplefilter("ignore")
        return key.private_bytes(PEM, fmt, enc).decode()


@pytest.fixture(scope="module")
def keys() -> dict[str, PrivateKey]:
    return {
        "ed25519": ed25519.Ed25519PrivateKey.generate(),
        "p256": ec.generate_private_key(ec.SECP256R1()),
        "p384": ec.generate_private_key(ec.SECP384R1()),
        "p521": ec.generate_private_key(ec.SECP521R1()),
        "rsa": rsa.generate_private_key(public_exponent=65537, key_size=2048),
        "dsa": dsa.generate_private_key(key_size=1024),  # SSH DSA is 1024 bits
        "secp256k1": ec.generate_private_key(ec.SECP256K1()),
        "x25519": x25519.X25519PrivateKey.generate(),
        "ed448": ed448.Ed448PrivateKey.generate(),
    }


OPENSSH = ser.PrivateFormat.OpenSSH
PKCS8 = ser.PrivateFormat.PKCS8
TRADITIONAL = ser.PrivateFormat.TraditionalOpenSSL  # "RSA/EC/DSA PRIVATE KEY"
FORMATS = {"openssh": OPENSSH, "pkcs8": PKCS8, "traditional": TRADITIONAL}

VALID = [
    ("ed25519", "openssh"),
    ("ed25519", "pkcs8"),
    ("p256", "openssh"),
    ("p384", "openssh"),
    ("p521", "openssh"),
    ("p256", "traditional"),
    ("p384", "pkcs8"),
    ("rsa", "openssh"),
    ("rsa", "traditional"),
    ("rsa", "pkcs8"),
    ("dsa", "openssh"),
    ("dsa", "traditional"),
    ("dsa", "pkcs8"),
]


@pytest.mark.parametrize(("name", "fmt"), VALID)
def test_unencrypted_private_keys_are_accepted(
    keys: dict[str, PrivateKey], name: str, fmt: str
) -> None:
    assert is_private_key(private_text(keys[name], FORMATS[fmt], NONE))


@pytest.mark.parametrize(
    ("name", "fmt"),
    [("rsa", "traditional"), ("p256", "traditional"), ("dsa", "traditional"), ("rsa", "pkcs8")],
)
def test_passphrase_protected_pem_keys_are_rejected(
    keys: dict[str, PrivateKey], name: str, fmt: str
) -> None:
    text = private_text(keys[name], FORMATS[fmt], PASSPHRASE)
    assert "ENCRYPTED" in text
    assert not is_private_key(text)


@pytest.mark.parametrize("name", ["x25519", "ed448", "secp256k1"])
def test_private_keys_ssh_has_no_type_for_are_rejected(
    keys: dict[str, PrivateKey], name: str
) -> None:
    assert not is_private_key(private_text(keys[name], PKCS8, NONE))


def test_carriage_returns_are_removed_first(keys: dict[str, PrivateKey]) -> None:
    for fmt in (OPENSSH, TRADITIONAL):
        text = private_text(keys["rsa"], fmt, NONE)
        assert is_private_key(text.replace("\n", "\r\n"))
        # Every \r goes, not only line endings: the parsers reject one inside a line.
        assert is_private_key("\r".join(text))


def test_surrounding_whitespace_is_accepted(keys: dict[str, PrivateKey]) -> None:
    text = private_text(keys["ed25519"], OPENSSH, NONE)
    assert is_private_key("\n  " + text + "\n\n")
    assert is_private_key(text.rstrip("\n"))


def test_public_keys_are_rejected(keys: dict[str, PrivateKey]) -> None:
    for name in ("ed25519", "p256", "rsa"):
        public = keys[name].public_key()
        assert not is_private_key(
            public.public_bytes(ser.Encoding.OpenSSH, ser.PublicFormat.OpenSSH).decode()
        )
        assert not is_private_key(
            public.public_bytes(PEM, ser.PublicFormat.SubjectPublicKeyInfo).decode()
        )
    rsa_public = keys["rsa"].public_key()
    assert not is_private_key(rsa_public.public_bytes(PEM, ser.PublicFormat.PKCS1).decode())


def test_certificates_are_rejected(keys: dict[str, PrivateKey]) -> None:
    key = keys["p256"]
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "marid")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    assert not is_private_key(cert.public_bytes(PEM).decode())

    signer = keys["ed25519"]
    assert isinstance(signer, ed25519.Ed25519PrivateKey)
    ssh_cert = (
        ser.SSHCertificateBuilder()
        .public_key(signer.public_key())
        .type(ser.SSHCertificateType.USER)
        .valid_principals([b"marid"])
        .valid_after(0)
        .valid_before(2**63)
        .sign(signer)
    )
    assert not is_private_key(ssh_cert.public_bytes().decode())


def openssh_body(text: str) -> bytes:
    lines = text.strip().splitlines()
    return base64.b64decode("".join(lines[1:-1]))


def openssh_text(body: bytes) -> str:
    encoded = base64.encodebytes(body).decode()
    return f"-----BEGIN OPENSSH PRIVATE KEY-----\n{encoded}-----END OPENSSH PRIVATE KEY-----\n"


def test_corrupted_and_truncated_keys_are_rejected(keys: dict[str, PrivateKey]) -> None:
    body = openssh_body(private_text(keys["ed25519"], OPENSSH, NONE))
    assert is_private_key(openssh_text(body))
    assert not is_private_key(openssh_text(body[: len(body) // 2]))
    # The two check integers that open the private section must agree.
    check = body.index(b"ssh-ed25519", body.index(b"ssh-ed25519") + 1) - 12
    broken = body[:check] + bytes([body[check] ^ 0xFF]) + body[check + 1 :]
    assert not is_private_key(openssh_text(broken))


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   ",
        "hello",
        "-----BEGIN OPENSSH PRIVATE KEY-----\n-----END OPENSSH PRIVATE KEY-----\n",
        "-----BEGIN RSA PRIVATE KEY-----\nbm90IGEga2V5\n-----END RSA PRIVATE KEY-----\n",
        "-----BEGIN OPENSSH PRIVATE KEY-----\n\ud800\n-----END OPENSSH PRIVATE KEY-----\n",
        "\x00" * 100,
    ],
)
def test_garbage_is_rejected(text: str) -> None:
    assert not is_private_key(text)


# ssh-keygen is what users actually run; its output is checked as well as cryptography's.
requires_ssh_keygen = pytest.mark.skipif(
    shutil.which("ssh-keygen") is None, reason="ssh-keygen is not installed"
)

SSH_KEYGEN_CASES = [
    ("ed25519", None),
    ("ecdsa", None),
    ("ecdsa", "PEM"),
    ("rsa", None),
    ("rsa", "PEM"),
    ("rsa", "PKCS8"),
]


def ssh_keygen(tmp_path: Path, key_type: str, fmt: str | None, passphrase: str) -> Path:
    path = tmp_path / f"id_{key_type}"
    cmd = ["ssh-keygen", "-q", "-t", key_type, "-N", passphrase, "-C", "marid", "-f", str(path)]
    if key_type == "rsa":
        cmd += ["-b", "2048"]
    if fmt:
        cmd += ["-m", fmt]
    subprocess.run(cmd, check=True, capture_output=True, timeout=60)
    return path


@requires_ssh_keygen
@pytest.mark.parametrize(("key_type", "fmt"), SSH_KEYGEN_CASES)
def test_ssh_keygen_unencrypted_keys_are_accepted(
    tmp_path: Path, key_type: str, fmt: str | None
) -> None:
    path = ssh_keygen(tmp_path, key_type, fmt, passphrase="")
    assert is_private_key(path.read_text())
    assert not is_private_key(path.with_suffix(".pub").read_text())


@requires_ssh_keygen
@pytest.mark.parametrize(("key_type", "fmt"), SSH_KEYGEN_CASES)
def test_ssh_keygen_passphrase_protected_keys_are_rejected(
    tmp_path: Path, key_type: str, fmt: str | None
) -> None:
    path = ssh_keygen(tmp_path, key_type, fmt, passphrase="correct horse")
    assert not is_private_key(path.read_text())
