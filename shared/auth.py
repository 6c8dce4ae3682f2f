"""API keys and the tokens a worker exchanges them for.

A key is a keyId and a secret. Baton keeps only a salted scrypt hash of
the secret, written `scrypt:<n>:<r>:<p>:<salt>:<digest>` (base64url).
`POST /api/token` trades a keyId and its secret for a token: a compact
JWT signed with HMAC-SHA256 (HS256) whose claims are `sub` (the keyId),
`iat` and `exp`. Every gateway replica holding the same signing key
verifies a token by its signature and its clock alone.

Make keys from the command line:

    python -m shared.auth new          # keyId, secret and BATON_AUTH_KEYS entry
    python -m shared.auth hash         # hash a secret read from stdin
    python -m shared.auth signing-key  # a random BATON_AUTH_SIGNING_KEY
"""

from __future__ import annotations

import argparse
import base64
import binascii
import getpass
import hashlib
import hmac
import re
import secrets
import sys
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import msgspec

from shared.clock import now_ms
from shared.errors import Unauthorized

SCRYPT_N = 1 << 14
"""scrypt's CPU/memory cost for new hashes: 16 MiB and tens of
milliseconds per check."""

SCRYPT_R = 8
SCRYPT_P = 1
MIN_SIGNING_KEY_CHARS = 32
"""The shortest BATON_AUTH_SIGNING_KEY accepted: 32 characters."""

_MIN_N = 1 << 10
_MAX_N = 1 << 20
_MAX_MEMORY = 256 << 20
_SALT_BYTES = 16
_DIGEST_BYTES = 32
_MAX_TOKEN_CHARS = 1024
_KEY_ID = re.compile(r"[A-Za-z0-9._-]{1,128}")
_ENTRY_SEPARATORS = re.compile(r"[\s,]+")


class InvalidToken(Unauthorized):
    """The X-Authorization token is missing, malformed, not signed with
    the signing key, or names a key that is not configured."""

    code = "INVALID_TOKEN"


class ExpiredToken(InvalidToken):
    """The token's `exp` has passed."""

    code = "EXPIRED_TOKEN"


class InvalidCredentials(Unauthorized):
    """The keyId is unknown or the secret does not match its hash."""

    code = "INVALID_CREDENTIALS"


# Key hashes.


def _b64encode(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _b64decode(text: str) -> bytes:
    """Decode unpadded base64url; ValueError if `text` is not that."""
    if not text.isascii():
        raise ValueError("not base64url")
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except binascii.Error:
        raise ValueError("not base64url") from None


@dataclass(frozen=True, slots=True)
class KeyHash:
    """A salted scrypt hash of a key secret."""

    n: int
    r: int
    p: int
    salt: bytes
    digest: bytes

    @classmethod
    def of(cls, secret: str, *, n: int = SCRYPT_N) -> KeyHash:
        """Hash `secret` with a new random salt.

        Raises ValueError if the secret is empty.
        """
        if not secret:
            raise ValueError("the secret is empty")
        salt = secrets.token_bytes(_SALT_BYTES)
        digest = _scrypt(secret, salt, n, SCRYPT_R, SCRYPT_P)
        return cls(n, SCRYPT_R, SCRYPT_P, salt, digest)

    @classmethod
    def parse(cls, text: str) -> KeyHash:
        """Read a hash written by `str()`; ValueError says what is wrong."""
        fields = text.split(":")
        if len(fields) != 6 or fields[0] != "scrypt":
            raise ValueError("a key hash reads scrypt:<n>:<r>:<p>:<salt>:<digest>")
        try:
            n, r, p = (int(field) for field in fields[1:4])
        except ValueError:
            raise ValueError("scrypt n, r and p must be integers") from None
        _check_cost(n, r, p)
        salt, digest = _b64decode(fields[4]), _b64decode(fields[5])
        if len(salt) < _SALT_BYTES or len(digest) != _DIGEST_BYTES:
            raise ValueError(
                f"the salt must have at least {_SALT_BYTES} bytes "
                f"and the digest {_DIGEST_BYTES}"
            )
        return cls(n, r, p, salt, digest)

    def __str__(self) -> str:
        return ":".join(
            (
                "scrypt",
                str(self.n),
                str(self.r),
                str(self.p),
                _b64encode(self.salt),
                _b64encode(self.digest),
            )
        )

    def matches(self, secret: str) -> bool:
        """True if `secret` hashes to this digest (compared in constant
        time). Slow on purpose: run it off the event loop."""
        digest = _scrypt(secret, self.salt, self.n, self.r, self.p)
        return hmac.compare_digest(digest, self.digest)


def _check_cost(n: int, r: int, p: int) -> None:
    """Refuse scrypt parameters too weak to slow a guess, or so costly
    that each token request would hold more than 256 MiB."""
    if n & (n - 1) or not _MIN_N <= n <= _MAX_N or not 1 <= p <= 16:
        raise ValueError("scrypt n must be a power of 2 from 2**10 to 2**20, p 1-16")
    if r < 1 or 128 * n * r > _MAX_MEMORY:
        raise ValueError("scrypt r must be at least 1 and 128 * n * r at most 256 MiB")


def _scrypt(secret: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    # OpenSSL refuses scrypt above `maxmem` (32 MiB by default); allow what
    # the parameters need, 128 * r * (n + p + 2) bytes, with room to spare.
    maxmem = 128 * r * (n + p + 2) + (1 << 20)
    return hashlib.scrypt(
        secret.encode(), salt=salt, n=n, r=r, p=p, maxmem=maxmem, dklen=_DIGEST_BYTES
    )


def hash_secret(secret: str) -> str:
    """The `scrypt:...` hash of `secret` to put in BATON_AUTH_KEYS."""
    return str(KeyHash.of(secret))


def parse_keys(text: str) -> dict[str, KeyHash]:
    """Read `keyId:hash` entries separated by commas, spaces or newlines;
    a `#` starts a comment that runs to the end of its line.

    Raises ValueError naming the entry that is wrong or repeated.
    """
    keys: dict[str, KeyHash] = {}
    lines = (line.partition("#")[0] for line in text.splitlines())
    entries = [e for line in lines for e in _ENTRY_SEPARATORS.split(line) if e]
    for number, entry in enumerate(entries, 1):
        key_id, _, hashed = entry.partition(":")
        if not _KEY_ID.fullmatch(key_id):
            raise ValueError(
                f"entry {number}: a keyId is 1-128 letters, digits, '.', '_' or '-'"
            )
        if key_id in keys:
            raise ValueError(f"entry {number}: keyId {key_id!r} is listed twice")
        try:
            keys[key_id] = KeyHash.parse(hashed)
        except ValueError as exc:
            raise ValueError(f"entry {number} ({key_id}): {exc}") from None
    return keys


# Tokens.


class _Claims(msgspec.Struct):
    sub: str
    iat: int
    exp: int


class _Header(msgspec.Struct):
    alg: str
    typ: str = "JWT"


_HEADER = _b64encode(msgspec.json.encode(_Header(alg="HS256")))
_claims_decoder = msgspec.json.Decoder(_Claims)
_header_decoder = msgspec.json.Decoder(_Header)


@dataclass(frozen=True, slots=True)
class TokenSigner:
    """Issues and checks HS256 JWTs valid for `ttl_seconds`."""

    key: bytes
    ttl_seconds: int

    def issue(self, key_id: str, now: int | None = None) -> str:
        """A token for `key_id`, issued at `now` (epoch seconds)."""
        issued = _now() if now is None else now
        claims = _Claims(sub=key_id, iat=issued, exp=issued + self.ttl_seconds)
        signed = f"{_HEADER}.{_b64encode(msgspec.json.encode(claims))}"
        return f"{signed}.{self._signature(signed)}"

    def verify(self, token: str, now: int | None = None) -> str:
        """The keyId a valid, unexpired token names.

        Raises InvalidToken (malformed, or not signed with this key) or
        ExpiredToken.
        """
        if (
            len(token) > _MAX_TOKEN_CHARS
            or not token.isascii()
            or token.count(".") != 2
        ):
            raise InvalidToken("the token is not a compact JWT")
        signed, _, signature = token.rpartition(".")
        if not hmac.compare_digest(self._signature(signed), signature):
            raise InvalidToken("the token's signature does not match")

        claims = _signed_claims(signed)
        if (_now() if now is None else now) >= claims.exp:
            raise ExpiredToken(f"the token of key {claims.sub} has expired")
        return claims.sub

    def _signature(self, signed: str) -> str:
        mac = hmac.new(self.key, signed.encode("ascii"), hashlib.sha256)
        return _b64encode(mac.digest())


def _signed_claims(signed: str) -> _Claims:
    """Decode the header and claims of a token whose signature matched."""
    header, _, payload = signed.partition(".")
    try:
        if _header_decoder.decode(_b64decode(header)).alg != "HS256":
            raise InvalidToken("the token is not HS256")
        return _claims_decoder.decode(_b64decode(payload))
    except (ValueError, msgspec.DecodeError):
        raise InvalidToken("the token is malformed") from None


def _now() -> int:
    return now_ms() // 1000


# Keys and tokens together.


class Authenticator:
    """Exchanges key secrets for tokens and checks tokens, against the
    configured keys; never touches the store."""

    def __init__(
        self, keys: Mapping[str, KeyHash], signing_key: str, ttl_seconds: int
    ) -> None:
        self._keys = dict(keys)
        self._signer = TokenSigner(signing_key.encode(), ttl_seconds)
        # Checked for unknown keyIds so that they cost what a known one
        # does, and the answer time does not tell which keyIds exist.
        self._decoy = KeyHash.of(secrets.token_urlsafe(16))

    @property
    def key_ids(self) -> frozenset[str]:
        """The configured keyIds."""
        return frozenset(self._keys)

    def exchange(self, key_id: str, secret: str) -> str:
        """A new token for a key whose secret matches. Slow on purpose
        (scrypt): run it off the event loop.

        Raises InvalidCredentials.
        """
        known = self._keys.get(key_id)
        matches = (known or self._decoy).matches(secret)
        if known is None or not matches:
            raise InvalidCredentials("invalid keyId or keySecret")
        return self._signer.issue(key_id)

    def authenticate(self, token: str) -> str:
        """The keyId of a valid token for a configured key.

        Raises InvalidToken or ExpiredToken.
        """
        key_id = self._signer.verify(token)
        if key_id not in self._keys:
            raise InvalidToken(f"key {key_id} is no longer configured")
        return key_id


# Command line.


def _read_secret() -> str:
    if sys.stdin.isatty():
        return getpass.getpass("key secret: ")
    return sys.stdin.readline().rstrip("\r\n")


def _cmd_hash(args: argparse.Namespace) -> str:
    secret = _read_secret()
    if len(secret) < 16:
        raise SystemExit("refusing a secret under 16 characters; `new` makes one")
    return hash_secret(secret)


def _cmd_new(args: argparse.Namespace) -> str:
    key_id = args.key_id or str(uuid.uuid4())
    if not _KEY_ID.fullmatch(key_id):
        raise SystemExit("a keyId is 1-128 letters, digits, '.', '_' or '-'")
    secret = secrets.token_urlsafe(32)
    return (
        f"CONDUCTOR_AUTH_KEY={key_id}\n"
        f"CONDUCTOR_AUTH_SECRET={secret}\n"
        f"BATON_AUTH_KEYS={key_id}:{hash_secret(secret)}"
    )


def _cmd_signing_key(args: argparse.Namespace) -> str:
    return secrets.token_urlsafe(48)


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m shared.auth {new,hash,signing-key}`; prints to stdout."""
    parser = argparse.ArgumentParser(
        prog="python -m shared.auth", description="Make Baton API keys."
    )
    commands = parser.add_subparsers(required=True, metavar="command")
    new = commands.add_parser(
        "new", help="make a keyId and secret, with the BATON_AUTH_KEYS entry"
    )
    new.add_argument("--key-id", help="the keyId (default: a random UUID)")
    new.set_defaults(run=_cmd_new)
    commands.add_parser(
        "hash", help="hash a secret read from stdin for BATON_AUTH_KEYS"
    ).set_defaults(run=_cmd_hash)
    commands.add_parser(
        "signing-key", help="print a random BATON_AUTH_SIGNING_KEY"
    ).set_defaults(run=_cmd_signing_key)
    args = parser.parse_args(argv)
    print(args.run(args))


if __name__ == "__main__":
    main()
