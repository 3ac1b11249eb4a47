"""Property tests of the parsing of access token ids and refresh tokens: whatever the text,
the answer is the token's claims or an AuthenticationError, never another exception (a
node parses the id of every task it receives, before any signature is checked)."""

from __future__ import annotations

import base64
import json
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kotta_executor.errors import AuthenticationError
from kotta_executor.security.tokens import Claims, _parse_refresh, parse_access_id
from kotta_executor.states import JobState
from tests.conftest import node_outlives, queue_crafted_task


def _kat(payload: bytes) -> str:
    return "kat1." + base64.urlsafe_b64encode(payload).rstrip(b"=").decode()


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=4),
    max_leaves=12,
)
_claim_values = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8) \
    | st.just(10**400) | st.just(-(10**400)) | st.lists(st.integers(), max_size=2)
_claims = st.fixed_dictionaries(
    {}, optional={k: _claim_values for k in ("u", "r", "a", "rid", "iat", "exp")})


def _parses_or_refuses(token_id) -> None:
    try:
        claims = parse_access_id(token_id)
    except AuthenticationError:
        return
    assert isinstance(claims, Claims)


@given(st.text(max_size=80) | st.text(max_size=80).map(lambda s: "kat1." + s))
def test_any_text_is_claims_or_an_authentication_error(text):
    _parses_or_refuses(text)


@given(st.binary(max_size=200) | _json.map(lambda v: json.dumps(v).encode()))
def test_any_payload_is_claims_or_an_authentication_error(payload):
    _parses_or_refuses(_kat(payload))


@given(_claims)
def test_any_claim_values_are_claims_or_an_authentication_error(claims):
    _parses_or_refuses(_kat(json.dumps(claims).encode()))


@pytest.mark.parametrize("opener", ["[", "{"])
@pytest.mark.parametrize("depth", [1, 999, 1000, 1500])
def test_deeply_nested_claims_are_an_authentication_error(depth, opener):
    """(Not a Hypothesis test: Hypothesis raises the recursion limit while it runs one.)"""
    payload = (opener * depth if opener == "[" else '{"u":' * (depth // 5)).encode()
    _parses_or_refuses(_kat(payload))


@given(st.text(max_size=60) | st.lists(st.text(max_size=6), max_size=4).map(".".join))
def test_any_refresh_token_text_is_its_parts_or_an_authentication_error(text):
    try:
        rid, secret = _parse_refresh(text)
    except AuthenticationError:
        return
    assert f"krt1.{rid}.{secret}" == text.strip()


def test_a_task_whose_token_id_nests_too_deep_does_not_kill_the_node(
    start_node, make_executor, enclave
):
    """An envelope whose ``auth`` is an access token id of claims nested ~1,500 deep (it
    fits in the 2,048 characters an id may take): the node's JSON parser gave up with a
    RecursionError, which no check caught: the node died, and so did every node after it
    that received the task."""
    ex = make_executor(1, start_node=False)
    job_id = queue_crafted_task(enclave, ex, lambda h: h.update(auth=_kat(b"[" * 1500)),
                                signed=False)
    job = node_outlives(start_node(workers=1), enclave, job_id)
    assert job.state == JobState.FAILED and "access token" in job.reason


# ------------------------------------------------------------------ the token file's entry

_entry_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8)
    | st.sampled_from(["kat1.e30", "AAAA", "!!", "kat1." + "A" * 8]),
    lambda inner: st.lists(inner, max_size=2) | st.dictionaries(
        st.sampled_from(["id", "key", "x"]), inner, max_size=2),
    max_leaves=6,
)


@pytest.fixture(scope="module")
def token_file(tmp_path_factory):
    """An enclave and a token file holding its OS user's (bootstrapped) token."""
    from kotta_executor.backends.embedded import EmbeddedEnclave
    from kotta_executor.security import credentials

    d = tmp_path_factory.mktemp("tokfile")
    with pytest.MonkeyPatch.context() as mp:  # (the autouse private home is per test)
        mp.setenv("KOTTA_HOME", str(d / "home"))
        mp.delenv("KOTTA_ENCLAVE", raising=False)
        enclave = EmbeddedEnclave(d / "enclave")
        credentials.load(enclave, None)  # (writes $KOTTA_HOME/token)
        path = credentials.token_path()
    yield enclave, path, json.loads(path.read_text())
    enclave.close()


@settings(max_examples=60, deadline=None)
@given(_entry_values)
def test_a_token_files_cached_access_token_of_any_shape_is_renewed_or_refused(token_file, access):
    """The access token cached in the token file (``"access": {"id": ..., "key": ...}``),
    damaged into any JSON: the client renews it from the refresh token, or refuses the
    file with an AuthenticationError; never a TypeError out of KottaExecutor or `kotta`."""
    from kotta_executor.security import credentials

    enclave, path, data = token_file
    entry = {**data[enclave.url], "access": access}
    path.write_text(json.dumps({**data, enclave.url: entry}))
    try:
        creds = credentials.load(enclave, path)
    except AuthenticationError:
        return
    assert creds.access().user == data[enclave.url]["user"]


@pytest.mark.parametrize("text", ["[" * 5000, '{"a": ' * 3000], ids=["array", "object"])
def test_a_token_file_nested_deeper_than_json_goes_is_damaged(tmp_path, enclave, text):
    """It raised the JSON parser's RecursionError, a traceback from every `kotta` command;
    broken JSON of any other kind is "damaged", an AuthenticationError naming the file."""
    from kotta_executor.security import credentials

    path = tmp_path / "token"
    path.write_text(text)
    os.chmod(path, 0o600)
    with pytest.raises(AuthenticationError, match="is damaged"):
        credentials.load(enclave, path)
