"""Encryption at rest for masked variable values, SSH private keys and webhook secrets.

A blob is `version (1 byte) || nonce (12 bytes) || AES-256-GCM ciphertext and tag (16 bytes)`.
The version byte lets a later key or algorithm be introduced without guessing what old rows hold;
it is also authenticated, together with the caller's associated data.
"""

from __future__ import annotations

import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

VERSION = 1
MIN_KEY_LENGTH = 32
NONCE_SIZE = 12  # 96 bits, the size GCM is designed for
TAG_SIZE = 16
OVERHEAD = 1 + NONCE_SIZE + TAG_SIZE

# Changing these changes every derived key and makes all stored blobs unreadable.
_HKDF_SALT = b"marid"
_HKDF_INFO = b"marid crypto v1 aes-256-gcm"


class DecryptionError(Exception):
    """The blob was tampered with, truncated, of an unknown version or made with another key."""


def _derive_key(secret: str) -> bytes:
    # HKDF-SHA256 rather than a bare SHA-256: `info` separates this key from any other one marid
    # may derive from crypto.key later, and names the version so a rotation can change it. No slow
    # password KDF: crypto.key is a long random config secret, not something a person memorises.
    hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=_HKDF_SALT, info=_HKDF_INFO)
    return hkdf.derive(secret.encode())


class Cipher:
    """AES-256-GCM with a key derived from the `crypto.key` config string."""

    def __init__(self, key: str) -> None:
        if len(key) < MIN_KEY_LENGTH:
            raise ValueError(f"crypto.key must be at least {MIN_KEY_LENGTH} characters")
        self._aead = AESGCM(_derive_key(key))  # the key string itself is not kept

    def __repr__(self) -> str:
        return "Cipher(<key hidden>)"

    def encrypt(self, plaintext: str | bytes, *, associated_data: bytes = b"") -> bytes:
        """A new blob for `plaintext` (str is UTF-8 encoded); a fresh random nonce every call."""
        data = plaintext.encode() if isinstance(plaintext, str) else plaintext
        nonce = os.urandom(NONCE_SIZE)
        header = bytes([VERSION])
        sealed = self._aead.encrypt(nonce, data, header + associated_data)
        return header + nonce + sealed

    def decrypt(self, blob: bytes, *, associated_data: bytes = b"") -> bytes:
        """The plaintext of `blob`; raises DecryptionError unless it authenticates."""
        if len(blob) < OVERHEAD:
            raise DecryptionError("ciphertext too short")
        if blob[0] != VERSION:
            raise DecryptionError(f"unknown ciphertext version {blob[0]}")
        nonce, sealed = blob[1 : 1 + NONCE_SIZE], blob[1 + NONCE_SIZE :]
        try:
            return self._aead.decrypt(nonce, sealed, blob[:1] + associated_data)
        except InvalidTag:
            raise DecryptionError("ciphertext does not authenticate") from None

    def encrypt_text(self, text: str, *, associated_data: bytes = b"") -> bytes:
        """A new blob for `text`, stored as UTF-8."""
        return self.encrypt(text.encode(), associated_data=associated_data)

    def decrypt_text(self, blob: bytes, *, associated_data: bytes = b"") -> str:
        """The text in `blob`; raises DecryptionError if it fails or does not hold UTF-8."""
        data = self.decrypt(blob, associated_data=associated_data)
        try:
            return data.decode()
        except UnicodeDecodeError:
            raise DecryptionError("plaintext is not UTF-8 text") from None
