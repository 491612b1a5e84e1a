import pytest

from marid.crypto import NONCE_SIZE, OVERHEAD, TAG_SIZE, VERSION, Cipher, DecryptionError

KEY = "marid-test-key-0123456789abcdef-0123456789"
OTHER_KEY = "another-key-0123456789abcdef-0123456789"

# Made once by Cipher(KEY).encrypt("s3cr3t-value", associated_data=b"variables:21"). Rows already
# stored must stay readable, so a change to the key derivation or blob layout has to fail here.
GOLDEN = bytes.fromhex(
    "019a33b62ce68685645146d84ac17f05b5487ca38221ce050314cc279a27c4e9cc2b0da59afbfce204"
)


@pytest.fixture
def cipher() -> Cipher:
    return Cipher(KEY)


def test_reads_a_blob_written_by_an_earlier_version(cipher: Cipher) -> None:
    assert cipher.decrypt_text(GOLDEN, associated_data=b"variables:21") == "s3cr3t-value"


@pytest.mark.parametrize("plaintext", [b"", b"x", b"\x00\xff" * 1000])
def test_bytes_round_trip(cipher: Cipher, plaintext: bytes) -> None:
    assert cipher.decrypt(cipher.encrypt(plaintext)) == plaintext


def test_text_round_trip_keeps_unicode(cipher: Cipher) -> None:
    text = "pässwörd ☃ -----BEGIN OPENSSH PRIVATE KEY-----\n"
    assert cipher.decrypt_text(cipher.encrypt_text(text)) == text
    assert cipher.decrypt(cipher.encrypt(text)) == text.encode()


def test_blob_layout_is_version_nonce_ciphertext_tag(cipher: Cipher) -> None:
    blob = cipher.encrypt(b"hello")
    assert blob[0] == VERSION == 1
    assert len(blob) == 1 + NONCE_SIZE + len(b"hello") + TAG_SIZE == OVERHEAD + 5
    assert b"hello" not in blob


def test_each_encryption_uses_a_fresh_nonce(cipher: Cipher) -> None:
    blobs = {cipher.encrypt(b"same value") for _ in range(50)}
    assert len(blobs) == 50
    assert len({blob[1 : 1 + NONCE_SIZE] for blob in blobs}) == 50


def test_a_cipher_from_the_same_key_string_decrypts(cipher: Cipher) -> None:
    assert Cipher(KEY).decrypt(cipher.encrypt(b"value")) == b"value"


def test_wrong_key_raises(cipher: Cipher) -> None:
    with pytest.raises(DecryptionError):
        Cipher(OTHER_KEY).decrypt(cipher.encrypt(b"value"))


def test_every_flipped_byte_is_detected(cipher: Cipher) -> None:
    blob = cipher.encrypt(b"secret")
    for index in range(len(blob)):
        tampered = bytearray(blob)
        tampered[index] ^= 0x01
        with pytest.raises(DecryptionError):
            cipher.decrypt(bytes(tampered))


@pytest.mark.parametrize("length", [0, 1, OVERHEAD - 1])
def test_truncated_blob_raises(cipher: Cipher, length: int) -> None:
    blob = cipher.encrypt(b"")
    with pytest.raises(DecryptionError):
        cipher.decrypt(blob[:length])


def test_dropping_a_trailing_byte_raises(cipher: Cipher) -> None:
    blob = cipher.encrypt(b"secret")
    with pytest.raises(DecryptionError):
        cipher.decrypt(blob[:-1])


def test_unknown_version_raises(cipher: Cipher) -> None:
    blob = cipher.encrypt(b"secret")
    with pytest.raises(DecryptionError, match="version 2"):
        cipher.decrypt(bytes([2]) + blob[1:])


def test_associated_data_binds_a_blob_to_its_row(cipher: Cipher) -> None:
    blob = cipher.encrypt(b"secret", associated_data=b"ssh_keys:1")
    assert cipher.decrypt(blob, associated_data=b"ssh_keys:1") == b"secret"
    with pytest.raises(DecryptionError):
        cipher.decrypt(blob, associated_data=b"ssh_keys:2")
    with pytest.raises(DecryptionError):
        cipher.decrypt(blob)


def test_decrypt_text_of_non_utf8_raises(cipher: Cipher) -> None:
    with pytest.raises(DecryptionError, match="UTF-8"):
        cipher.decrypt_text(cipher.encrypt(b"\xff\xfe"))


def test_short_key_is_rejected() -> None:
    with pytest.raises(ValueError, match="at least 32"):
        Cipher("x" * 31)
    Cipher("x" * 32)


def test_repr_does_not_reveal_the_key(cipher: Cipher) -> None:
    assert KEY not in repr(cipher)
    assert KEY not in str(vars(cipher))
