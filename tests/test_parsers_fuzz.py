"""Parsers fed arbitrary input: each returns a valid value or raises the project's error
for it, naming the problem; never a bare KeyError/TypeError/AttributeError/IndexError, and
never garbage taken as valid."""

from __future__ import annotations

import json
import math
import tempfile
import uuid
from pathlib import Path

import psutil
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from kotta_executor import config
from kotta_executor.errors import ConfigurationError, InvalidDataUri
from kotta_executor.security.uris import check_output_name, parse_uri

FAST = settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=12,
)
LIMIT_FIELDS = st.sampled_from(["max_walltime", "memory_mb", "workers"])
QUEUE_NAMES = st.sampled_from(["test", "production", "prod", "Test", "PROD"]) | st.text(max_size=12)


# --------------------------------------------------------------------------- queues.json


@FAST
@given(st.dictionaries(QUEUE_NAMES, st.dictionaries(LIMIT_FIELDS, JSON, max_size=3) | JSON,
                       max_size=3) | JSON)
@example({"test": {"workers": 2.7}})
@example({"prod": {"memory_mb": 1024.5}})
def test_any_queues_json_is_limits_or_a_configuration_error(tmp_path, data) -> None:
    path = tmp_path / "queues.json"
    path.write_text(json.dumps(data))
    try:
        limits = config._read_limits(path)
    except ConfigurationError as exc:
        assert str(path) in str(exc)
        return
    for queue, lim in limits.items():
        assert queue in config.QUEUES
        assert math.isfinite(lim.max_walltime) and lim.max_walltime > 0
        assert lim.max_walltime_seconds > 0 and math.isfinite(lim.max_walltime_seconds)
        for name in ("memory_mb", "workers"):
            value = getattr(lim, name)
            assert type(value) is int and value >= 1
        given_fields = data[next(k for k in data if config.normalize_queue(k) == queue)]
        for name, value in given_fields.items():  # taken as written, not rounded
            assert getattr(lim, name) == value


@FAST
@given(st.binary(max_size=40))
def test_any_queues_json_bytes_are_limits_or_a_configuration_error(tmp_path, raw) -> None:
    path = tmp_path / "queues.json"
    path.write_bytes(raw)
    try:
        config._read_limits(path)
    except ConfigurationError as exc:
        assert str(path) in str(exc)


# --------------------------------------------------------------------------- data URIs


@FAST
@given(st.text(max_size=40).map(lambda t: "s3://" + t) | st.text(max_size=40))
def test_any_text_is_a_data_uri_or_invalid_data_uri(text) -> None:
    try:
        d = parse_uri(text)
    except InvalidDataUri as exc:
        assert str(exc)
        return
    d.key.encode("utf-8")
    assert ".." not in d.key.split("/")
    assert parse_uri(d.uri) == d


@FAST
@given(st.text(max_size=20))
def test_any_output_name_is_a_plain_file_name_or_invalid_data_uri(name) -> None:
    try:
        got = check_output_name(name)
    except InvalidDataUri as exc:
        assert str(exc)
        return
    assert got == name and "/" not in name and name not in (".", "..")


# --------------------------------------------------------------------------- node/staging

FILE_NAME_TEXT = st.text(st.characters(blacklist_characters="/\0",
                                       blacklist_categories=("Cs",)), max_size=16)


@FAST
@given(FILE_NAME_TEXT)
@example("²-1-x")  # str.isdigit's digit that int() refuses: it raised out of every node start
@example("٣-1-x")
def test_any_name_in_the_script_tmpdir_is_swept_or_left_alone(monkeypatch, tmp_path, rest) -> None:
    from kotta_executor.config import SCRIPT_DIR_PREFIX, SCRIPT_TMPDIR_ENV
    from node import staging

    top = Path(tempfile.mkdtemp(dir=tmp_path))
    name = SCRIPT_DIR_PREFIX + rest
    if len(name.encode()) > 255:
        return
    (top / name).mkdir()
    monkeypatch.setenv(SCRIPT_TMPDIR_ENV, str(top))
    removed = staging.sweep_dead_script_dirs()  # never raises, whatever is there
    for gone in removed:  # only a worker's of this namespace whose pid has no process
        pid = gone.removeprefix(SCRIPT_DIR_PREFIX).partition("-")[0]
        assert pid.isascii() and pid.isdigit() and not psutil.pid_exists(int(pid))


ENV_TEXT = st.text(st.characters(blacklist_characters="\0", blacklist_categories=("Cs",)),
                   min_size=1, max_size=16)


@FAST
@given(ENV_TEXT, st.sampled_from(["KOTTA_ENVS", "XDG_CACHE_HOME"]))
@example("/tmp/envs\n", "KOTTA_ENVS")  # (read from a file with its newline: a new, empty
@example(" /tmp/envs", "KOTTA_ENVS")  # directory of environments, each built again)
@example("   ", "XDG_CACHE_HOME")
def test_any_envs_variable_is_a_directory_or_a_configuration_error(monkeypatch, value,
                                                                   variable) -> None:
    from node import envs

    monkeypatch.delenv("KOTTA_ENVS", raising=False)
    monkeypatch.setenv(variable, value)
    try:
        root = envs.default_root(local=False)
    except ConfigurationError as exc:
        assert f"${variable}" in str(exc)
        return
    assert value[:1].strip() and value[-1:].strip()  # taken: it neither begins nor ends blank
    assert isinstance(root, Path)


# --------------------------------------------------------------------------- NodeConfig


@FAST
@given(st.text(max_size=20))
@example("../../elsewhere")  # its staging area (made, swept beside, removed) was out there
@example("a/b")
@example("")  # (none: the node makes one)
@example("x\n")
def test_any_node_id_is_a_plain_name_or_refused(node_id) -> None:
    from node.daemon import NodeConfig

    try:
        cfg = NodeConfig(node_id=node_id, workers=1)
    except (ValueError, TypeError) as exc:
        assert "node_id" in str(exc)
        return
    assert cfg.node_id == node_id
    if not node_id:
        return
    assert "/" not in node_id and node_id not in (".", "..")
    assert node_id.isprintable() and not any(ch.isspace() for ch in node_id)


# --------------------------------------------------------------------------- datasets


@FAST
@given(JSON | st.builds(object) | st.binary(max_size=4))
@example(object())  # the change was audited, then a bare TypeError: never made
@example(5)  # kept as 5, no description
def test_any_dataset_description_is_text_or_refused(enclave, description) -> None:
    from kotta_executor.security.audit import AuditLog
    from kotta_executor.security.policy import PolicyStore

    log = AuditLog(enclave)
    store = PolicyStore(enclave.records, audit=log.append)
    before = len(log.show())
    try:
        ds = store.add_dataset("s3://bkt/fuzz/", by="root", description=description)
    except ConfigurationError as exc:
        assert "description" in str(exc)
        assert len(log.show()) == before  # nothing audited of a change never made
        return
    assert isinstance(ds.description, str) and ds.description == description
    assert store.dataset("s3://bkt/fuzz/").description == description


# --------------------------------------------------------------------------- users


@FAST
@given(JSON)
@example("no")  # a setting read as text: the user was made an admin
@example("false")
@example(0)
def test_an_admin_or_disabled_flag_is_true_or_false_or_refused(enclave, flag) -> None:
    from kotta_executor.security.tokens import TokenService

    tokens = TokenService(enclave)
    tokens.add_user("root2", "analyst", by="root", admin=True, if_absent=True)
    bob = f"bob{uuid.uuid4().hex[:8]}"  # (the enclave is the same for every example)
    try:
        tokens.add_user(bob, "analyst", by="root", admin=flag)
    except TypeError as exc:
        assert "admin" in str(exc) and not isinstance(flag, bool)
        assert tokens.user(bob) is None
    else:
        assert isinstance(flag, bool) and tokens.user(bob).admin is flag
    tokens.add_user("carol", "analyst", by="root", if_absent=True)
    try:
        tokens.set_disabled("carol", flag, by="root")
    except TypeError as exc:
        assert "disabled" in str(exc) and not isinstance(flag, bool)
        assert tokens.user("carol").disabled is False
    else:
        assert isinstance(flag, bool) and tokens.user("carol").disabled is flag
        tokens.set_disabled("carol", False, by="root")


@FAST
@given(st.integers(min_value=-2**70, max_value=2**70).map(str) | FILE_NAME_TEXT)
@example(str(10**20))  # past a C long: OverflowError out of os.kill, out of the node's start
@example("4194305")
def test_any_pid_of_a_script_dir_of_this_namespace_is_swept_or_left_alone(
        monkeypatch, tmp_path, pid) -> None:
    from kotta_executor.config import SCRIPT_DIR_PREFIX, SCRIPT_TMPDIR_ENV, script_dir_prefix
    from node import staging

    top = Path(tempfile.mkdtemp(dir=tmp_path))
    ours = script_dir_prefix(0).removeprefix(f"{SCRIPT_DIR_PREFIX}0-")  # (a task's own
    name = f"{SCRIPT_DIR_PREFIX}{pid}-{ours}x"  # user may make such a directory)
    if len(name.encode()) > 255:
        return
    (top / name).mkdir()
    monkeypatch.setenv(SCRIPT_TMPDIR_ENV, str(top))
    removed = staging.sweep_dead_script_dirs()  # never raises, whatever is there
    assert removed in ([], [name])
    if removed:
        assert pid.isascii() and pid.isdigit() and not psutil.pid_exists(int(pid))
