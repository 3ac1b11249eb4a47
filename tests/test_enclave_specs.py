"""Property tests of enclave specs (``--enclave``, ``$KOTTA_ENCLAVE``, ``enclave=``):
whatever the text, :func:`check_spec` accepts it (a directory, an embedded:// or aws://
URL of the right form) or raises a ConfigurationError naming it; opening nothing."""

from __future__ import annotations

import os
import re
from urllib.parse import urlencode

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from kotta_executor.backends import check_spec
from kotta_executor.backends.aws import parse_url
from kotta_executor.errors import ConfigurationError

_parts = st.sampled_from([
    "aws://", "aws:", "AWS:/", "embedded://", "s3://", "lab", "lab-1", "[", "]", "?", "&",
    "region=", "endpoint_url=", "max_attempts=", "=", "/", "#", "%", "%zz", ":", "@", " ",
])


@settings(max_examples=300)
@given(st.lists(_parts | st.text(max_size=3), max_size=8).map("".join))
def test_any_spec_is_accepted_or_a_configuration_error(spec):
    try:
        check_spec(spec)
    except ConfigurationError:
        pass


@settings(max_examples=300)
@given(st.lists(_parts | st.text(max_size=3), max_size=8).map(lambda p: "aws://" + "".join(p)))
@example("aws://?endpoint_url=aws://")  # (a bad endpoint_url, no name: the URL went unnamed)
@example("aws://lab?region=%23")  # (values that, written back unquoted, are a fragment,
@example("aws://lab?region=%26")  # or an empty parameter: both refused)
def test_any_aws_url_is_a_name_and_parameters_or_a_configuration_error_naming_it(url):
    try:
        name, params = parse_url(url)
    except ConfigurationError as exc:
        assert repr(url) in str(exc) or repr(url.split("://", 1)[1].split("?")[0]) in str(exc) \
            or "invalid AWS enclave name" in str(exc), exc
        return
    assert parse_url(f"aws://{name}?" + urlencode(params))[0] == name


@pytest.mark.parametrize("url", ["aws://lab]", "aws://[lab", "aws://la[b?region=eu-west-1"])
def test_an_aws_url_with_a_bracket_is_a_configuration_error_naming_it(url):
    """urlsplit takes a '[' or ']' in the host for an IPv6 address: its bare ValueError,
    "Invalid IPv6 URL", came out of `kotta --enclave` and `kotta node`, naming neither the
    URL nor what is wrong with it."""
    with pytest.raises(ConfigurationError, match=f"{url!r}".replace("[", r"\[").replace("?", r"\?")):
        check_spec(url)


@settings(max_examples=200)
@given(st.text(max_size=12) | st.sampled_from(["a\0b", "embedded:///tmp/x\0y", "\ud800dir",
                                               "embedded://\udce9"]))
def test_a_directory_spec_is_one_the_os_takes_or_a_configuration_error(spec):
    """A NUL byte or a lone surrogate in an enclave's directory passed check_spec (and
    connect()), then came out of the first use as the OS layer's bare ValueError
    ("embedded null byte") or UnicodeEncodeError, naming no enclave."""
    from kotta_executor.backends import _embedded_home

    try:
        check_spec(spec)
    except ConfigurationError:
        return
    home = _embedded_home(spec)
    if home is not None:
        assert "\0" not in home
        os.fsencode(home)


@pytest.mark.parametrize("value", [" ", "\t", "  \n"])
def test_a_blank_kotta_enclave_is_an_error_naming_it(value, tmp_path, monkeypatch):
    """``KOTTA_ENCLAVE=" "`` (a blank value, as a shell script's unquoted ``$X `` leaves)
    made an enclave in a directory named " " in the working directory; an empty one is
    unset (the default enclave), as ``enclave=""`` is."""
    from kotta_executor import KottaExecutor, connect
    from kotta_executor.backends import open_enclave

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("KOTTA_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("KOTTA_ENCLAVE", value)
    for make in (open_enclave, lambda: KottaExecutor(1, start_node=False)):
        with pytest.raises(ConfigurationError, match=r"\$KOTTA_ENCLAVE is blank"):
            make()
    assert os.listdir(tmp_path) == []
    monkeypatch.setenv("KOTTA_ENCLAVE", "")
    with connect(start_node=False) as konn:
        assert konn.executor.enclave.url == f"embedded://{tmp_path / 'home'}"


def test_a_blank_kotta_home_is_an_error_naming_it(tmp_path, monkeypatch):
    """``KOTTA_HOME=" "`` made the default enclave in a directory named " " in the
    working directory, as a blank $KOTTA_ENCLAVE did; an empty one is unset (~/.kotta)."""
    from kotta_executor import KottaExecutor, connect
    from kotta_executor.backends import open_enclave

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("KOTTA_ENCLAVE", raising=False)
    monkeypatch.setenv("KOTTA_HOME", " ")
    for make in (open_enclave, lambda: KottaExecutor(1, start_node=False),
                 lambda: connect(start_node=False)):
        with pytest.raises(ConfigurationError, match=r"\$KOTTA_HOME is blank"):
            make()
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("spec", [" ", "\t", "embedded:// "])
def test_a_blank_enclave_is_an_error_naming_it(spec, tmp_path, monkeypatch):
    """``enclave=" "`` (or ``--enclave " "``) made an enclave in a directory named " " in
    the working directory; ``enclave=""`` is the default one, as None is."""
    from kotta_executor import KottaExecutor, connect
    from kotta_executor.backends import open_enclave

    monkeypatch.chdir(tmp_path)
    for make in (check_spec, open_enclave, lambda s: KottaExecutor(1, enclave=s, start_node=False),
                 lambda s: connect(s, start_node=False)):
        with pytest.raises(ConfigurationError, match=r"is blank"):
            make(spec)
    assert os.listdir(tmp_path) == []
    monkeypatch.setenv("KOTTA_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("KOTTA_ENCLAVE", raising=False)
    for default in ("", "embedded://"):  # (the default enclave, made by nothing here)
        check_spec(default)


@pytest.mark.parametrize(("spec", "env"), [
    (" {tmp}/lab", None), ("embedded:// {tmp}/lab", None), ("\tlab", None),
    (None, " {tmp}/lab"), (None, "embedded:// lab"),
])
def test_an_enclave_that_begins_with_a_blank_is_an_error_naming_it(
        spec, env, tmp_path, monkeypatch):
    """``KOTTA_ENCLAVE=" /data/lab"`` (a blank pasted with the path) made an enclave in
    ./" /data/lab", a tree of new directories under the working directory."""
    from kotta_executor import KottaExecutor, connect
    from kotta_executor.backends import open_enclave

    monkeypatch.chdir(tmp_path)
    if env is not None:
        monkeypatch.setenv("KOTTA_ENCLAVE", env.format(tmp=tmp_path))
    spec = spec and spec.format(tmp=tmp_path)
    for make in (check_spec, open_enclave,
                 lambda s: KottaExecutor(1, enclave=s, start_node=False),
                 lambda s: connect(s, start_node=False)):
        with pytest.raises(ConfigurationError, match=r"begins with a blank"):
            make(spec)
    assert os.listdir(tmp_path) == []
    check_spec("./ lab")  # (a directory so named, said so)


def test_a_kotta_home_that_begins_with_a_blank_is_an_error_naming_it(tmp_path, monkeypatch):
    """``KOTTA_HOME=" /data/home"`` made the default enclave in ./" /data/home", as
    such an enclave= did (above)."""
    from kotta_executor import connect
    from kotta_executor.backends import open_enclave

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("KOTTA_ENCLAVE", raising=False)
    monkeypatch.setenv("KOTTA_HOME", f" {tmp_path}/home")
    for make in (open_enclave, lambda: connect(start_node=False)):
        with pytest.raises(ConfigurationError, match=r"\$KOTTA_HOME .* begins with a blank"):
            make()
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(("spec", "env"), [
    ("{tmp}/lab ", None), ("embedded://{tmp}/lab ", None), ("lab\t", None), ("lab\n", None),
    (None, "{tmp}/lab "), (None, "embedded://lab\n"),
])
def test_an_enclave_that_ends_with_a_blank_is_an_error_naming_it(
        spec, env, tmp_path, monkeypatch):
    """``KOTTA_ENCLAVE="/data/lab "`` (or one read from a file, with its newline) was
    taken as it is: a new, empty enclave in "/data/lab ", next to the one meant, its tasks
    waiting for nodes that serve the other; one beginning with a blank was refused."""
    from kotta_executor import KottaExecutor, connect
    from kotta_executor.backends import open_enclave

    monkeypatch.chdir(tmp_path)
    if env is not None:
        monkeypatch.setenv("KOTTA_ENCLAVE", env.format(tmp=tmp_path))
    spec = spec and spec.format(tmp=tmp_path)
    given = spec if spec is not None else env.format(tmp=tmp_path)
    # (the directory, as for a beginning one; $KOTTA_ENCLAVE's whole value, its scheme kept)
    meant = given.removeprefix("embedded://").rstrip() if spec is not None else given.rstrip()
    for make in (check_spec, open_enclave,
                 lambda s: KottaExecutor(1, enclave=s, start_node=False),
                 lambda s: connect(s, start_node=False)):
        with pytest.raises(ConfigurationError,
                           match=re.escape(f"ends with a blank: did you mean {meant!r}?")):
            make(spec)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(("spec", "env", "said"), [
    (None, "{tmp}/lab\n", "$KOTTA_ENCLAVE '{tmp}/lab\\n' ends with a blank"),
    (None, " {tmp}/lab", "$KOTTA_ENCLAVE ' {tmp}/lab' begins with a blank"),
    (None, "embedded://lab ", "$KOTTA_ENCLAVE 'embedded://lab ' ends with a blank: did you"
                              " mean 'embedded://lab'?"),  # (its scheme kept)
    (None, "embedded:// lab", "$KOTTA_ENCLAVE 'embedded:// lab' ' lab' begins with a blank"),
    ("{tmp}/lab ", None, "enclave '{tmp}/lab ' ends with a blank"),
    ("embedded:// lab", None, "enclave 'embedded:// lab' ' lab' begins with a blank"),
])
def test_a_blank_at_an_end_of_the_enclave_names_where_it_came_from(
        spec, env, said, tmp_path, monkeypatch):
    """A $KOTTA_ENCLAVE read from a file with its newline was refused as "enclave
    '/data/lab\\n' '/data/lab\\n' ends with a blank": it named an enclave the user never
    passed, not the variable to fix, and the value twice."""
    from kotta_executor import KottaExecutor

    monkeypatch.chdir(tmp_path)
    if env is not None:
        monkeypatch.setenv("KOTTA_ENCLAVE", env.format(tmp=tmp_path))
    spec = spec and spec.format(tmp=tmp_path)
    with pytest.raises(ConfigurationError) as raised:
        KottaExecutor(1, enclave=spec, start_node=False)
    said = said.format(tmp=tmp_path)
    assert str(raised.value).startswith(said if said.endswith("?") else said + ":"), (
        str(raised.value))

@pytest.mark.parametrize("env", ["aws://lab\n", "aws://lab ", "aws://lab?region=us-east-1\n",
                                 "aws://lab?region=us-east-1\t"])
def test_an_aws_kotta_enclave_that_ends_with_a_blank_is_an_error_naming_it(env, monkeypatch):
    """``export KOTTA_ENCLAVE=$(cat file)`` can leave a newline: ``aws://lab\n`` was taken
    as ``aws://lab`` (urlsplit drops it), where the embedded form was refused."""
    from kotta_executor import KottaExecutor

    monkeypatch.setenv("KOTTA_ENCLAVE", env)
    for make in (check_spec, lambda s: KottaExecutor(1, enclave=s, start_node=False)):
        with pytest.raises(ConfigurationError) as raised:
            make(None)
        assert str(raised.value).startswith(
            f"$KOTTA_ENCLAVE {env!r} ends with a blank: did you mean {env.rstrip()!r}?"), (
            str(raised.value))


@pytest.mark.parametrize("url", ["aws://lab\n", "aws://la\nb", "aws://lab\t?region=us-east-1",
                                 "\x01aws://lab", "aws://lab?region=us-east-1\r\n",
                                 "aws://lab?region=us-east-1&bucket=a-b\n-c"])
def test_an_aws_url_with_a_blank_or_control_character_is_refused_naming_it(url):
    """urlsplit drops a tab, CR or LF anywhere in a URL, and control characters at its
    start: such an enclave URL was taken as another (``aws://la\nb`` opened ``lab``)."""
    with pytest.raises(ConfigurationError) as raised:
        parse_url(url)
    assert repr(url) in str(raised.value) and "blank or control character" in str(
        raised.value), str(raised.value)
    if url.startswith("aws://"):  # (another start is another scheme: said so)
        with pytest.raises(ConfigurationError, match="blank or control character"):
            check_spec(url)


@pytest.mark.parametrize(("url", "said"), [
    ("aws://lab?endpoint_url=", "endpoint_url"), ("aws://lab?region=&bucket=b-c", "region"),
    ("aws://lab?bucket", "bucket"), ("aws://lab?region=us-east-1&profile=", "profile")])
def test_an_aws_url_with_an_empty_parameter_is_refused_naming_it(url, said):
    """``aws://lab?endpoint_url=$EMULATOR`` with the variable unset was taken as no
    endpoint at all: the enclave on AWS itself, with the user's real credentials (and
    ``?bucket=`` the default bucket), without a word."""
    for check in (parse_url, check_spec):
        with pytest.raises(ConfigurationError) as raised:
            check(url)
        assert f"empty parameter(s) {said} in {url!r}" in str(raised.value), str(raised.value)


def test_a_kotta_home_that_ends_with_a_blank_is_an_error_naming_it(tmp_path, monkeypatch):
    """``KOTTA_HOME="/data/home "`` made the default enclave in "/data/home ", as such an
    enclave= did (above)."""
    from kotta_executor import connect
    from kotta_executor.backends import open_enclave

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("KOTTA_ENCLAVE", raising=False)
    monkeypatch.setenv("KOTTA_HOME", f"{tmp_path}/home ")
    for make in (open_enclave, lambda: connect(start_node=False)):
        with pytest.raises(ConfigurationError,
                           match=r"\$KOTTA_HOME .* ends with a blank: did you mean"):
            make()
    assert os.listdir(tmp_path) == []
