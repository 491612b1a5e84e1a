"""SSH private key checks for `POST /keys` (docs/api.md §13.3)."""

from __future__ import annotations

import warnings

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import (
    load_pem_private_key,
    load_ssh_private_key,
)
from cryptography.utils import CryptographyDeprecationWarning

OPENSSH_HEADER = b"-----BEGIN OPENSSH PRIVATE KEY-----"

# The curves OpenSSH has key types for (ecdsa-sha2-nistp256/384/521).
_SSH_CURVES = frozenset({"secp256r1", "secp384r1", "secp521r1"})


def is_private_key(text: str) -> bool:
    """Whether `text` is an unencrypted OpenSSH or PEM private key that ssh can use."""
    try:
        data = text.replace("\r", "").encode()
        key = _load(data)
    # ValueError: malformed (also a lone surrogate from JSON); TypeError: passphrase protected;
    # UnsupportedAlgorithm: a key type or cipher cryptography cannot load; NotImplementedError:
    # a compressed EC point in an OpenSSH key (found by fuzzing the loaders).
    except (ValueError, TypeError, UnsupportedAlgorithm, NotImplementedError):
        return False
    return _usable_by_ssh(key)


def _load(data: bytes) -> object:
    if OPENSSH_HEADER not in data:
        return load_pem_private_key(data, password=None)
    # OpenSSH DSA keys still work with Djinn and older ssh clients, so accept them without
    # letting cryptography's deprecation of SSH DSA reach the caller.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CryptographyDeprecationWarning)
        return load_ssh_private_key(data, password=None)


def _usable_by_ssh(key: object) -> bool:
    # PKCS#8 also carries keys ssh has no type for (X25519, Ed448, other curves): a build would
    # fail on them much later, so they are rejected here.
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return key.curve.name in _SSH_CURVES
    return isinstance(key, rsa.RSAPrivateKey | dsa.DSAPrivateKey | ed25519.Ed25519PrivateKey)
