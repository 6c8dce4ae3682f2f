"""Key hashes, tokens, the auth settings and the key-making command line."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from shared.auth import (
    Authenticator,
    ExpiredToken,
    InvalidCredentials,
    InvalidToken,
    KeyHash,
    TokenSigner,
    hash_secret,
    parse_keys,
)
from shared.config import ConfigError, Settings

ROOT = Path(__file__).resolve().parents[2]
SECRET = "s3cret-that-must-never-be-stored-0b1e"
SIGNING_KEY = "signing-key-" + "k" * 40
NOW = 1_700_000_000


@pytest.fixture(scope="module")
def key_hash() -> KeyHash:
    """One hash of SECRET (scrypt is slow on purpose: made once)."""
    return KeyHash.of(SECRET)


def b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def unb64(text: str) -> Any:
    return json.loads(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)))


def jwt(header: dict[str, Any], claims: dict[str, Any], key: str) -> str:
    """A compact JWT built independently of shared.auth."""
    signed = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}"
    mac = hmac.new(key.encode(), signed.encode(), hashlib.sha256).digest()
    return f"{signed}.{b64(mac)}"


# Key hashes.


def test_hash_matches_its_secret_only(key_hash: KeyHash) -> None:
    assert key_hash.matches(SECRET)
    assert not key_hash.matches(SECRET + "x")
    assert not key_hash.matches("")


def test_hash_round_trips_through_its_text_without_the_secret(
    key_hash: KeyHash,
) -> None:
    text = str(key_hash)
    assert text.startswith("scrypt:16384:8:1:")
    assert SECRET not in text
    assert KeyHash.parse(text) == key_hash
    assert KeyHash.parse(text).matches(SECRET)


def test_same_secret_hashes_differently_each_time(key_hash: KeyHash) -> None:
    other = KeyHash.parse(hash_secret(SECRET))
    assert other.salt != key_hash.salt
    assert other.digest != key_hash.digest
    assert other.matches(SECRET)


def test_empty_secret_is_refused() -> None:
    with pytest.raises(ValueError, match="empty"):
        KeyHash.of("")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda f: ["bcrypt", *f[1:]], "scrypt:<n>"),
        (lambda f: f[:5], "scrypt:<n>"),
        (lambda f: [f[0], "lots", *f[2:]], "integers"),
        (lambda f: [f[0], "1000", *f[2:]], "power of 2"),
        (lambda f: [f[0], "16", *f[2:]], "power of 2"),
        (lambda f: [f[0], str(1 << 21), *f[2:]], "power of 2"),
        (lambda f: [*f[:2], "0", *f[3:]], "r must"),
        (lambda f: [f[0], str(1 << 20), "64", *f[3:]], "256 MiB"),
        (lambda f: [*f[:4], "not*base64", f[5]], "base64url"),
        (lambda f: [*f[:4], f[4][:8], f[5]], "salt"),
        (lambda f: [*f[:5], f[5][:20]], "digest"),
    ],
)
def test_malformed_hashes_are_refused_with_the_reason(
    key_hash: KeyHash, change: Any, message: str
) -> None:
    fields = str(key_hash).split(":")
    with pytest.raises(ValueError, match=message):
        KeyHash.parse(":".join(change(fields)))


def test_key_list_takes_commas_spaces_newlines_and_comments(
    key_hash: KeyHash,
) -> None:
    text = (
        f"# workers\nalpha:{key_hash}, beta.1:{key_hash}\n"
        f"  gamma_2:{key_hash}  # the billing worker\n\n"
    )
    keys = parse_keys(text)
    assert list(keys) == ["alpha", "beta.1", "gamma_2"]
    assert all(value == key_hash for value in keys.values())
    assert parse_keys("") == {}


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        ("alpha:{h},alpha:{h}", r"entry 2: keyId 'alpha' is listed twice"),
        ("al/pha:{h}", r"entry 1: a keyId is"),
        (":{h}", r"entry 1: a keyId is"),
        ("alpha", r"entry 1 \(alpha\): a key hash reads"),
        ("alpha:{h} beta:scrypt:1", r"entry 2 \(beta\)"),
    ],
)
def test_bad_key_lists_name_the_entry(
    key_hash: KeyHash, entries: str, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        parse_keys(entries.format(h=key_hash))


# Tokens.


def test_token_is_an_hs256_jwt_naming_the_key() -> None:
    token = TokenSigner(SIGNING_KEY.encode(), 600).issue("alpha", now=NOW)
    header, claims, signature = token.split(".")
    assert unb64(header) == {"alg": "HS256", "typ": "JWT"}
    assert unb64(claims) == {"sub": "alpha", "iat": NOW, "exp": NOW + 600}
    signed = f"{header}.{claims}".encode()
    mac = hmac.new(SIGNING_KEY.encode(), signed, hashlib.sha256).digest()
    assert signature == b64(mac)


def test_token_verifies_until_it_expires() -> None:
    signer = TokenSigner(SIGNING_KEY.encode(), 600)
    token = signer.issue("alpha", now=NOW)
    assert signer.verify(token, now=NOW) == "alpha"
    assert signer.verify(token, now=NOW + 599) == "alpha"
    with pytest.raises(ExpiredToken, match="alpha has expired") as expired:
        signer.verify(token, now=NOW + 600)
    assert expired.value.code == "EXPIRED_TOKEN"
    assert expired.value.status == 401


def test_token_signed_with_another_key_is_invalid() -> None:
    token = TokenSigner(b"another-key-" + b"x" * 40, 600).issue("alpha", now=NOW)
    with pytest.raises(InvalidToken, match="signature") as refused:
        TokenSigner(SIGNING_KEY.encode(), 600).verify(token, now=NOW)
    assert refused.value.code == "INVALID_TOKEN"


def test_tampered_claims_are_invalid() -> None:
    signer = TokenSigner(SIGNING_KEY.encode(), 600)
    header, _, signature = signer.issue("alpha", now=NOW).split(".")
    for claims in (
        {"sub": "root", "iat": NOW, "exp": NOW + 600},
        {"sub": "alpha", "iat": NOW, "exp": NOW + 10**9},
    ):
        forged = f"{header}.{b64(json.dumps(claims).encode())}.{signature}"
        with pytest.raises(InvalidToken, match="signature"):
            signer.verify(forged, now=NOW)


@pytest.mark.parametrize(
    "token",
    [
        "",
        "not-a-token",
        "a.b",
        "a.b.c.d",
        "é.b.c",
        "a." * 600 + "b",
    ],
)
def test_malformed_tokens_are_invalid(token: str) -> None:
    with pytest.raises(InvalidToken, match="not a compact JWT"):
        TokenSigner(SIGNING_KEY.encode(), 600).verify(token, now=NOW)


@pytest.mark.parametrize(
    ("header", "claims"),
    [
        ({"alg": "none", "typ": "JWT"}, {"sub": "alpha", "iat": NOW, "exp": NOW + 9}),
        ({"alg": "HS256"}, {"sub": "alpha", "exp": NOW + 9}),
        ({"alg": "HS256"}, {"sub": 5, "iat": NOW, "exp": NOW + 9}),
        ({"alg": "HS256"}, {"sub": "alpha", "iat": NOW, "exp": "later"}),
    ],
)
def test_signed_tokens_of_another_shape_are_invalid(
    header: dict[str, Any], claims: dict[str, Any]
) -> None:
    token = jwt(header, claims, SIGNING_KEY)
    with pytest.raises(InvalidToken, match=r"HS256|malformed"):
        TokenSigner(SIGNING_KEY.encode(), 600).verify(token, now=NOW)


def test_independently_signed_token_verifies() -> None:
    claims = {"sub": "alpha", "iat": NOW, "exp": NOW + 60}
    token = jwt({"alg": "HS256", "typ": "JWT"}, claims, SIGNING_KEY)
    assert TokenSigner(SIGNING_KEY.encode(), 600).verify(token, now=NOW) == "alpha"


# Keys and tokens together.


def test_authenticator_exchanges_a_matching_secret_for_a_token(
    key_hash: KeyHash,
) -> None:
    authenticator = Authenticator({"alpha": key_hash}, SIGNING_KEY, 600)
    token = authenticator.exchange("alpha", SECRET)
    assert authenticator.authenticate(token) == "alpha"
    for key_id, secret in (("alpha", "wrong"), ("nobody", SECRET)):
        with pytest.raises(InvalidCredentials) as refused:
            authenticator.exchange(key_id, secret)
        assert refused.value.code == "INVALID_CREDENTIALS"
        assert refused.value.message == "invalid keyId or keySecret"


def test_token_of_a_removed_key_is_invalid(key_hash: KeyHash) -> None:
    before = Authenticator({"alpha": key_hash}, SIGNING_KEY, 600)
    token = before.exchange("alpha", SECRET)
    after = Authenticator({"beta": key_hash}, SIGNING_KEY, 600)
    with pytest.raises(InvalidToken, match="alpha is no longer configured"):
        after.authenticate(token)


# Settings.


def env_with(key_hash: KeyHash, **extra: str) -> dict[str, str]:
    return {
        "BATON_AUTH_KEYS": f"alpha:{key_hash}",
        "BATON_AUTH_SIGNING_KEY": SIGNING_KEY,
        **extra,
    }


def test_auth_is_off_by_default() -> None:
    settings = Settings.from_env({})
    assert settings.auth_keys == ()
    assert settings.auth_signing_key == ""
    assert settings.auth_token_ttl_seconds == 3600


def test_settings_read_keys_signing_key_and_ttl(
    key_hash: KeyHash, tmp_path: Path
) -> None:
    keys_file = tmp_path / "keys"
    keys_file.write_text(f"# mounted from a Secret\nbeta:{key_hash}\n")
    settings = Settings.from_env(
        env_with(
            key_hash,
            BATON_AUTH_KEYS_FILE=str(keys_file),
            BATON_AUTH_SIGNING_KEY=f"  {SIGNING_KEY}\n",
            BATON_AUTH_TOKEN_TTL_SECONDS="90",
        )
    )
    assert settings.auth_keys == (("alpha", key_hash), ("beta", key_hash))
    assert settings.auth_signing_key == SIGNING_KEY
    assert settings.auth_token_ttl_seconds == 90
    assert SIGNING_KEY not in repr(settings)
    assert str(key_hash) not in repr(settings)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"BATON_AUTH_SIGNING_KEY": ""}, "BATON_AUTH_SIGNING_KEY must be set"),
        ({"BATON_AUTH_SIGNING_KEY": "short"}, "at least 32 characters"),
        ({"BATON_AUTH_KEYS": ""}, "BATON_AUTH_SIGNING_KEY is set but"),
        ({"BATON_AUTH_KEYS": "alpha:nope"}, "BATON_AUTH_KEYS: entry 1 \\(alpha\\)"),
        ({"BATON_AUTH_KEYS_FILE": "/nonexistent/keys"}, "BATON_AUTH_KEYS_FILE: "),
        ({"BATON_AUTH_TOKEN_TTL_SECONDS": "0"}, "BATON_AUTH_TOKEN_TTL_SECONDS"),
    ],
)
def test_bad_auth_settings_stop_the_start(
    key_hash: KeyHash, change: dict[str, str], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        Settings.from_env(env_with(key_hash, **change))


def test_a_key_in_both_sources_is_refused(key_hash: KeyHash, tmp_path: Path) -> None:
    keys_file = tmp_path / "keys"
    keys_file.write_text(f"alpha:{key_hash}\n")
    with pytest.raises(ConfigError, match="BATON_AUTH_KEYS_FILE: keyId 'alpha'"):
        Settings.from_env(env_with(key_hash, BATON_AUTH_KEYS_FILE=str(keys_file)))


# Command line.


def run_cli(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "shared.auth", *args],
        cwd=ROOT,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_cli_hash_reads_the_secret_from_stdin() -> None:
    done = run_cli("hash", stdin=f"{SECRET}\n")
    assert done.returncode == 0, done.stderr
    printed = done.stdout.strip()
    assert SECRET not in printed
    assert KeyHash.parse(printed).matches(SECRET)


def test_cli_hash_refuses_a_short_secret() -> None:
    done = run_cli("hash", stdin="short\n")
    assert done.returncode != 0
    assert "16 characters" in done.stderr
    assert done.stdout == ""


def test_cli_new_prints_sdk_settings_and_a_keys_entry() -> None:
    done = run_cli("new", "--key-id", "billing-worker")
    assert done.returncode == 0, done.stderr
    printed = dict(line.split("=", 1) for line in done.stdout.splitlines())
    assert set(printed) == {
        "CONDUCTOR_AUTH_KEY",
        "CONDUCTOR_AUTH_SECRET",
        "BATON_AUTH_KEYS",
    }
    assert printed["CONDUCTOR_AUTH_KEY"] == "billing-worker"
    secret = printed["CONDUCTOR_AUTH_SECRET"]
    assert len(secret) >= 32
    keys = parse_keys(printed["BATON_AUTH_KEYS"])
    assert keys["billing-worker"].matches(secret)


def test_cli_signing_key_is_long_enough_for_the_settings() -> None:
    done = run_cli("signing-key")
    assert done.returncode == 0, done.stderr
    assert len(done.stdout.strip()) >= 32
