from __future__ import annotations

import hashlib
import re
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy.orm import Session

from api.core.auth import (
    authenticate,
    create_api_key,
    create_org,
    require_scope,
    revoke_api_key,
)
from api.core.errors import Conflict, Forbidden, InvalidInput, NotFound, Unauthorized
from api.core.models import ApiKey

from .helpers import new_org

RAW_KEY = re.compile(r"^cr_(?P<prefix>[a-z0-9]{8})_(?P<secret>[A-Za-z0-9]{40})$")


def test_create_org_names(any_session: Session) -> None:
    org = new_org(any_session)
    with pytest.raises(Conflict, match="already exists"):
        create_org(session=any_session, name=org.name)
    for bad in ["", " ", "-leading-dash", "x" * 101, "semi;colon", "new\nline"]:
        with pytest.raises(InvalidInput):
            create_org(session=any_session, name=bad)


def test_key_is_random_hashed_and_authenticates(any_session: Session) -> None:
    org = new_org(any_session)
    key, raw = create_api_key(session=any_session, org_name=org.name, name="ci")
    other_key, other_raw = create_api_key(session=any_session, org_name=org.name)
    any_session.commit()

    match = RAW_KEY.match(raw)
    assert match is not None and match["prefix"] == key.prefix
    assert other_raw != raw and other_key.prefix != key.prefix
    # Only the SHA-256 of the secret part is stored, never the key.
    assert key.secret_hash == hashlib.sha256(match["secret"].encode()).hexdigest()
    assert raw not in (key.secret_hash, key.prefix) and match["secret"] not in key.secret_hash
    assert key.scopes == ["read", "write"]

    found = authenticate(session=any_session, raw_key=raw)
    assert found.id == key.id and found.org.name == org.name
    assert authenticate(session=any_session, raw_key=f"  {raw}\n").id == key.id


def test_wrong_keys_are_unauthorized(any_session: Session) -> None:
    org = new_org(any_session)
    _key, raw = create_api_key(session=any_session, org_name=org.name)
    any_session.commit()
    prefix_part, secret = raw.rsplit("_", 1)
    flipped = secret[:-1] + ("A" if secret[-1] != "A" else "B")
    for bad in [
        f"{prefix_part}_{flipped}",        # right prefix, wrong secret
        f"cr_zzzzzzzz_{secret}",           # unknown prefix
        raw[:-1],                          # one character short: a different secret
        "cr_short_abc",                    # malformed
        "Bearer " + raw,                   # header pasted whole
        "",
    ]:
        with pytest.raises(Unauthorized):
            authenticate(session=any_session, raw_key=bad)


def test_revoked_and_expired_keys_are_refused(any_session: Session) -> None:
    org = new_org(any_session)
    now = datetime(2030, 1, 1, tzinfo=UTC)
    key, raw = create_api_key(session=any_session, org_name=org.name)
    revoked = revoke_api_key(session=any_session, prefix=key.prefix)
    first_revoked_at = revoked.revoked_at
    assert first_revoked_at is not None
    assert revoke_api_key(session=any_session, prefix=key.prefix).revoked_at == first_revoked_at
    with pytest.raises(Unauthorized, match="revoked"):
        authenticate(session=any_session, raw_key=raw)

    expiring, raw2 = create_api_key(session=any_session, org_name=org.name,
                                    expires_at=now + timedelta(hours=1))
    any_session.commit()
    assert authenticate(session=any_session, raw_key=raw2, now=now).id == expiring.id
    with pytest.raises(Unauthorized, match="expired"):
        authenticate(session=any_session, raw_key=raw2, now=now + timedelta(hours=1))
    with pytest.raises(NotFound):
        revoke_api_key(session=any_session, prefix="nosuchpx")


def test_last_used_at_written_at_most_once_a_minute(any_session: Session) -> None:
    org = new_org(any_session)
    key, raw = create_api_key(session=any_session, org_name=org.name)
    any_session.commit()
    t0 = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)

    authenticate(session=any_session, raw_key=raw, now=t0)
    assert key.last_used_at == t0
    any_session.commit()
    authenticate(session=any_session, raw_key=raw, now=t0 + timedelta(seconds=59))
    assert not any_session.dirty  # nothing to write within the minute
    assert key.last_used_at == t0
    authenticate(session=any_session, raw_key=raw, now=t0 + timedelta(seconds=60))
    assert key.last_used_at == t0 + timedelta(seconds=60)
    any_session.commit()
    any_session.expire_all()
    reloaded = any_session.get(ApiKey, key.id)
    assert reloaded is not None and reloaded.last_used_at == t0 + timedelta(seconds=60)


def test_scopes(any_session: Session) -> None:
    org = new_org(any_session)
    reader, _ = create_api_key(session=any_session, org_name=org.name, scopes=["read"])
    require_scope(reader, "read")
    with pytest.raises(Forbidden) as raised:
        require_scope(reader, "write")
    assert raised.value.status == 403 and raised.value.extra == {"scope": "write"}
    with pytest.raises(InvalidInput, match="unknown scope"):
        create_api_key(session=any_session, org_name=org.name, scopes=["root"])
    with pytest.raises(InvalidInput, match="at least one scope"):
        create_api_key(session=any_session, org_name=org.name, scopes=[])
    with pytest.raises(NotFound):
        create_api_key(session=any_session, org_name="no-such-org-anywhere")
