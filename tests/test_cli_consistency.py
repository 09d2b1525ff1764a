"""One consistent command line: --version; --json on every command that prints data; the
logging and data-directory options everywhere; usage errors exit 2; a closed pipe stops a
command quietly; operating-system errors are sentences naming the path; ``audit`` verify,
tail -f and search; ``decrypt-file`` says which check failed when the file shows it."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from server import clean_env, database_env, run_cli

from hsmkms import __version__
from hsmkms.cli.main import _leaves, build_parser
from hsmkms.envelope import EnvelopeHeader

pytestmark = pytest.mark.hsm

# Commands whose output is not data about the system (files, a running server): no --json.
NO_JSON = {
    "hsmkms serve": "runs the server; its banner is for people, /healthz and /metrics for tools",
    "hsmkms encrypt-file": "writes the encrypted file, prints nothing",
    "hsmkms decrypt-file": "writes the decrypted file, prints nothing",
    "hsmkms seed export": "writes the seed file itself (YAML), which is the data",
    "hsmkms rewrap": "rewrites the file, prints nothing",
}


def _leaf_parsers() -> dict[str, argparse.ArgumentParser]:
    return {leaf.prog: leaf for leaf in _leaves(build_parser())}


def _options(parser: argparse.ArgumentParser) -> set[str]:
    return {o for action in parser._actions for o in action.option_strings}


def test_version() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "hsmkms.cli.main", "--version"],
        capture_output=True, text=True, timeout=60, check=False, env=clean_env(),
    )  # fmt: skip
    assert proc.returncode == 0
    assert proc.stdout == f"hsmkms {__version__}\n"


def test_the_command_table_names_every_command() -> None:
    """main builds the parser of the command being run from COMMANDS alone (importing only
    its module): the table must hold every command, and that parser must be the full one's."""
    import importlib
    import pkgutil

    import hsmkms.cli
    from hsmkms.cli.main import COMMANDS

    command_modules = {
        info.name
        for info in pkgutil.iter_modules(hsmkms.cli.__path__)
        if hasattr(importlib.import_module(f"hsmkms.cli.{info.name}"), "add_parser")
    }
    assert command_modules == set(COMMANDS.values()), "a command module missing from COMMANDS"
    full = _leaf_parsers()
    assert {prog.split()[1] for prog in full} == set(COMMANDS)
    for command in COMMANDS:
        alone = {leaf.prog: leaf for leaf in _leaves(build_parser(command))}
        assert {p for p in alone if p.split()[1] == command} == {
            p for p in full if p.split()[1] == command
        }
        for prog, leaf in alone.items():
            assert _options(leaf) == _options(full[prog]), prog


_IMPORTS_OF_A_REMOTE_RUN = """
import sys
from hsmkms.cli.main import main
code = main(["encrypt-file", sys.argv[1], sys.argv[2], "--key-id", "alias/k",
             "--endpoint-url", "http://127.0.0.1:9"])
print(code)
print(" ".join(sorted(sys.modules)))
"""


def test_endpoint_url_runs_import_no_local_service(tmp_path: Path) -> None:
    """``encrypt-file`` / ``decrypt-file --endpoint-url`` start fast: they import neither the
    other commands nor what only the local data directory needs (the service, the store,
    the token, SQLAlchemy, pydantic), nor boto3 over botocore."""
    (tmp_path / "plain").write_bytes(b"x")
    done = subprocess.run(
        [sys.executable, "-c", _IMPORTS_OF_A_REMOTE_RUN, str(tmp_path / "plain"),
         str(tmp_path / "out")],
        capture_output=True, text=True, timeout=60, check=True,
        env=clean_env(
            AWS_ACCESS_KEY_ID="x", AWS_SECRET_ACCESS_KEY="y", AWS_DEFAULT_REGION="us-east-1",
            AWS_MAX_ATTEMPTS="1",
        ),
    )  # fmt: skip
    code, modules = done.stdout.splitlines()[-2:]
    assert code == "1"  # nothing listens there
    assert "KMS endpoint error" in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain"]
    loaded = set(modules.split())
    assert "botocore.session" in loaded
    for heavy in (
        "hsmkms.service", "hsmkms.system", "hsmkms.store", "hsmkms.keystore.pkcs11",
        "hsmkms.cli.audit", "hsmkms.cli.serve", "sqlalchemy", "pydantic", "boto3", "pkcs11",
    ):  # fmt: skip
        assert heavy not in loaded


@pytest.mark.parametrize("prog", sorted(_leaf_parsers()))
def test_every_command_takes_the_common_options(prog: str) -> None:
    options = _options(_leaf_parsers()[prog])
    assert {"--log-level", "--log-format", "--data-dir"} <= options
    if prog in NO_JSON:
        assert "--json" not in options
    else:
        assert "--json" in options, f"{prog} prints data: give it --json"


@pytest.mark.parametrize("prog", sorted(_leaf_parsers()))
def test_a_usage_error_exits_2_for_every_command(
    prog: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from hsmkms.cli.main import main

    with pytest.raises(SystemExit) as exit_:
        main([*prog.split()[1:], "--no-such-option"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: ")
    assert ": error: " in err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["encrypt-file", "a", "b", "--key-id", "k", "--context", "x"], "--context needs"),
        (["rewrap", "-", "--key-id", "k"], "rewrap needs a file, not -"),
        (["credentials", "create", "--name", "no spaces"], "a user name is 1-64 characters"),
        (["restore", "b.tar.gz", "--expect-digest", "abc"], "--expect-digest takes the 64"),
        (["serve", "--workers", "0"], "--workers must be at least 1"),
        (["serve", "--tls-cert", "c.pem"], "--tls-cert and --tls-key must be given together"),
        (["audit", "tail", "-f", "--json"], "--json prints one array"),
        (["audit", "tail", "-n", "0"], "must be 1 or more"),
    ],
)
def test_bad_option_values_are_usage_errors(tmp_path: Path, args: list[str], message: str) -> None:
    assert run_cli("init", "--data-dir", str(tmp_path / "d")).returncode == 0
    proc = run_cli(*args, "--data-dir", str(tmp_path / "d"))
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr


# --------------------------------------------------------------------------------------------
# A data directory with keys, an alias, a user and a trail of some length
# --------------------------------------------------------------------------------------------

_SET_UP = """
import sys
from pathlib import Path
from hsmkms import models as m
from hsmkms.cli.envelope import _local_service
with _local_service(Path(sys.argv[1])) as service:
    key = service.create_key(m.CreateKeyRequest()).KeyMetadata.KeyId
    service.create_alias(m.CreateAliasRequest(AliasName="alias/app", TargetKeyId=key))
    print(key)
"""


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    path = tmp_path_factory.mktemp("consistency") / "data"
    assert run_cli("init", "--data-dir", str(path)).returncode == 0
    done = subprocess.run(
        [sys.executable, "-c", _SET_UP, str(path)], capture_output=True, text=True,
        timeout=120, check=True, env=clean_env(),
    )  # fmt: skip
    key = done.stdout.strip().splitlines()[-1]
    plain = path.parent / "plain.txt"
    plain.write_text("x" * 100)
    # Audited local calls: the trail grows (GenerateDataKey). Four processes at a time, as
    # several shells would run them.
    _encrypt_files(path, plain, [path.parent / f"c{n}" for n in range(40)], "alias/app")
    return path, key


_ENCRYPT_MANY = """
import sys
from hsmkms.cli.main import main
data_dir, key, plain, *outs = sys.argv[1:]
for out in outs:
    code = main(["encrypt-file", plain, out, "--key-id", key, "--data-dir", data_dir])
    if code:
        sys.exit(code)
"""


def _encrypt_files(data_dir: Path, plain: Path, outs: list[Path], key: str) -> None:
    """``hsmkms encrypt-file`` of ``plain`` to each of ``outs``: audited local calls
    (GenerateDataKey). Four processes write the trail at once, as several shells would; each
    runs its share of the commands in one interpreter (a process start costs about a second of
    imports, which 40 starts per call made the slowest setup of the suite)."""

    def one(share: list[Path]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-c", _ENCRYPT_MANY, str(data_dir), key, str(plain), *map(str, share)],
            env=clean_env(**database_env(data_dir, None)), capture_output=True, text=True,
            timeout=120, check=False,
        )  # fmt: skip

    with ThreadPoolExecutor(max_workers=4) as pool:
        done = list(pool.map(one, [outs[n::4] for n in range(4)]))
    assert [(d.returncode, d.stderr) for d in done] == [(0, "")] * 4
    assert all(out.is_file() for out in outs)


def _cli(data_dir: Path, *args: str, **kw: Any) -> subprocess.CompletedProcess[str]:
    return run_cli(*args, "--data-dir", str(data_dir), **kw)


@pytest.mark.parametrize("command", ["decrypt-file", "audit tail"])
def test_a_closed_pipe_stops_a_command_quietly(
    data: tuple[Path, str], tmp_path: Path, command: str
) -> None:
    """``hsmkms decrypt-file big.bin - | head -c 10`` or ``hsmkms audit tail -n 1000 | head``:
    the command exits 141 (like ``yes | head``), with nothing on stderr."""
    data_dir, key = data
    if command == "decrypt-file":
        big = tmp_path / "big.txt"
        big.write_bytes(os.urandom(4 << 20))
        args = ["encrypt-file", str(big), str(tmp_path / "big.bin"), "--key-id", key]
        assert _cli(data_dir, *args).returncode == 0
        argv = ["decrypt-file", str(tmp_path / "big.bin"), "-"]
    else:
        plain = data_dir.parent / "plain.txt"
        # Enough records to fill the pipe: ~1 KB each.
        _encrypt_files(data_dir, plain, [tmp_path / f"m{n}" for n in range(40)], key)
        argv = ["audit", "tail", "-n", "1000"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "hsmkms.cli.main", *argv, "--data-dir", str(data_dir)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=clean_env(),
    )  # fmt: skip
    assert proc.stdout is not None
    assert proc.stdout.read(10)
    proc.stdout.close()
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 141
    assert err == b""


def test_os_errors_are_sentences_naming_the_path(data: tuple[Path, str], tmp_path: Path) -> None:
    data_dir, key = data
    missing = _cli(data_dir, "encrypt-file", str(tmp_path / "absent"), "out", "--key-id", key)
    assert missing.returncode == 1
    assert missing.stderr == f"hsmkms encrypt-file: {tmp_path / 'absent'} does not exist\n"
    inside_a_file = tmp_path / "file"
    inside_a_file.write_text("x")
    report = _cli(data_dir, "report", "--out", str(inside_a_file / "r.html"))
    assert report.returncode == 1
    assert report.stderr.endswith(
        f"hsmkms report: a part of {inside_a_file / 'r.html'} is not a directory\n"
    )
    directory = _cli(data_dir, "report", "verify", str(tmp_path))
    assert directory.stderr.endswith(f"{tmp_path} is a directory\n")


def test_audit_verify_json_and_tail_json(data: tuple[Path, str]) -> None:
    data_dir, _ = data
    proc = _cli(data_dir, "audit", "verify", "--json")
    assert proc.returncode == 0
    result = json.loads(proc.stdout)
    assert result["Status"] == "ok"
    assert result["Records"] >= 40
    number, tag = result["NewestSeal"].split(":")
    assert int(number) == result["Seals"]
    assert len(tag) == 64
    tail = _cli(data_dir, "audit", "tail", "-n", "3", "--json")
    records = json.loads(tail.stdout)
    assert len(records) == 3
    assert all(r["userIdentity"]["type"] == "LocalOperator" for r in records)


def test_audit_tail_follows_the_trail(data: tuple[Path, str]) -> None:
    data_dir, key = data
    proc = subprocess.Popen(
        [sys.executable, "-m", "hsmkms.cli.main", "audit", "tail", "-f", "-n", "1", "--data-dir",
         str(data_dir)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=clean_env(),
        start_new_session=True,
    )  # fmt: skip
    assert proc.stdout is not None
    try:
        first = json.loads(proc.stdout.readline())
        plain = data_dir.parent / "plain.txt"
        out = data_dir.parent / "followed.bin"
        assert _cli(data_dir, "encrypt-file", str(plain), str(out), "--key-id", key).returncode == 0
        following = json.loads(proc.stdout.readline())
        assert following["eventName"] == "GenerateDataKey"
        assert following["eventID"] != first["eventID"]
        assert following["userAgent"].endswith("(encrypt-file)")
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        proc.communicate(timeout=30)
    assert proc.returncode == 130


def test_audit_search_resolves_aliases_and_names_and_says_what_matched_nothing(
    data: tuple[Path, str],
) -> None:
    data_dir, key = data
    by_alias = _cli(data_dir, "audit", "search", "--key-id", "alias/app", "--json")
    by_key = _cli(data_dir, "audit", "search", "--key-id", key, "--json")
    assert by_alias.returncode == 0, by_alias.stderr
    assert json.loads(by_alias.stdout) == json.loads(by_key.stdout)
    assert len(json.loads(by_key.stdout)) >= 40
    nobody = _cli(data_dir, "audit", "search", "--principal", "alice")
    assert nobody.returncode == 1
    assert nobody.stdout == ""
    assert nobody.stderr == (
        "hsmkms audit search: no record matches --principal alice "
        "(arn:aws:iam::111122223333:user/alice)\n"
    )
    misspelt = _cli(data_dir, "audit", "search", "--event-name", "Decrpyt", "--key-id", key)
    assert misspelt.returncode == 1
    assert misspelt.stderr == (
        "hsmkms audit search: no record matches --event-name Decrpyt (hsmkms records no event "
        "of that name: names are CloudTrail's, e.g. Decrypt)\n"
    )
    early = _cli(data_dir, "audit", "search", "--event-name", "GenerateDataKey",
                 "--until", "2000-01-01")  # fmt: skip
    assert early.returncode == 1
    assert early.stderr == (
        "hsmkms audit search: no record matches --until 2000-01-01T00:00:00+00:00\n"
    )
    records = json.loads(by_key.stdout)
    first, last = records[0]["eventTime"], records[-1]["eventTime"]
    assert first < last
    together = _cli(data_dir, "audit", "search", "--since", last, "--until", first)
    assert together.returncode == 1
    assert together.stderr.endswith(" together\n")
    assert "no record matches --since" in together.stderr
    unknown_alias = _cli(data_dir, "audit", "search", "--key-id", "alias/none")
    assert unknown_alias.returncode == 1
    assert "no alias alias/none (now)" in unknown_alias.stderr
    root = _cli(data_dir, "audit", "search", "--principal", "root")
    assert root.returncode == 1  # the local operator's calls name no principal
    assert "(arn:aws:iam::111122223333:root)" in root.stderr


# --------------------------------------------------------------------------------------------
# decrypt-file says which check failed when the file shows it
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sealed(data: tuple[Path, str]) -> Path:
    data_dir, key = data
    plain = data_dir.parent / "secret.txt"
    plain.write_bytes(os.urandom(10_000))
    out = data_dir.parent / "secret.bin"
    done = _cli(data_dir, "encrypt-file", str(plain), str(out), "--key-id", key,
                "--context", "team=blue", "--context", "app=x")  # fmt: skip
    assert done.returncode == 0, done.stderr
    return out


def _decrypt_error(data_dir: Path, path: Path, *args: str) -> str:
    out = path.with_suffix(".out")
    proc = _cli(data_dir, "decrypt-file", str(path), str(out), *args)
    assert proc.returncode == 1, proc.stderr
    assert not out.exists()
    assert proc.stderr.count("\n") == 1
    prefix = "hsmkms decrypt-file: decryption failed"
    assert proc.stderr.startswith(prefix)
    return proc.stderr.removeprefix(prefix).removesuffix("\n")


def test_decrypt_file_names_the_failed_check_the_header_shows(
    data: tuple[Path, str], sealed: Path, tmp_path: Path
) -> None:
    data_dir, _ = data
    message = sealed.read_bytes()
    header, length = EnvelopeHeader.parse(message)

    def variant(name: str, content: bytes) -> Path:
        path = tmp_path / name
        path.write_bytes(content)
        return path

    assert _decrypt_error(data_dir, variant("other", b"PK\x03\x04 not ours" * 10)) == (
        f": {tmp_path / 'other'} is not a file made by hsmkms encrypt-file"
    )
    assert _decrypt_error(data_dir, variant("cut", message[: length - 5])) == (
        f": {tmp_path / 'cut'} is cut short: its header is incomplete ({length - 5} bytes)"
    )
    assert _decrypt_error(data_dir, variant("chopped", message[: length + 10])) == (
        f": {tmp_path / 'chopped'} is cut short or has bytes added after its end (its payload "
        "is no whole number of segments)"
    )
    other = "arn:aws:kms:us-east-1:111122223333:key/00000000-0000-4000-8000-000000000000"
    assert _decrypt_error(data_dir, sealed, "--key-id", other) == (
        f": {sealed} was encrypted under key {header.key_arn}, not {other}"
    )
    assert _decrypt_error(data_dir, sealed, "--context", "team=red") == (
        f": {sealed}'s encryption context does not hold --context team=... as given (its keys: "
        "app, team)"
    )
    foreign = EnvelopeHeader.parse(message)[0].with_wrapped_key(other, header.encrypted_data_key)
    moved = variant("foreign", foreign.to_bytes() + message[length:])
    assert _decrypt_error(data_dir, moved) == (
        f": {moved} was encrypted under key {other}, which the data directory {data_dir} does "
        "not hold (another data directory, or --endpoint-url)"
    )
    account = other.replace("111122223333", "444455556666")
    elsewhere = variant(
        "account", header.with_wrapped_key(account, header.encrypted_data_key).to_bytes()
        + message[length:],
    )  # fmt: skip
    assert "under a key of account 444455556666 in us-east-1; this data directory is account " in (
        _decrypt_error(data_dir, elsewhere)
    )
    # The payload itself failing stays the one opaque failure.
    flipped = bytearray(message)
    flipped[-1] ^= 1
    assert _decrypt_error(data_dir, variant("flipped", bytes(flipped))) == (
        ": not an hsmkms envelope, modified or truncated, or the wrong key or encryption context"
    )


def test_the_context_rule_encrypt_file_states_is_the_one_decrypt_file_applies(
    data: tuple[Path, str], sealed: Path
) -> None:
    """encrypt-file --help: decrypt-file needs none of the context, and checks each pair it is
    given (a subset passes, a pair the file lacks fails)."""
    data_dir, _ = data
    helptext = run_cli("encrypt-file", "--help").stdout
    assert "decrypt-file needs none of it" in " ".join(helptext.split())
    for args, ok in (
        ((), True),
        (("--context", "team=blue"), True),
        (("--context", "team=blue", "--context", "app=x"), True),
        (("--context", "region=eu"), False),
    ):
        out = sealed.with_name("rule.out")
        proc = _cli(data_dir, "decrypt-file", str(sealed), str(out), *args)
        assert (proc.returncode == 0) is ok, (args, proc.stderr)
        out.unlink(missing_ok=True)


def test_json_on_the_commands_that_lacked_it(data: tuple[Path, str], tmp_path: Path) -> None:
    data_dir, _ = data
    purge = json.loads(_cli(data_dir, "purge", "--json").stdout)
    assert purge == {"Deleted": [], "LostAuditRecords": 0}
    made = json.loads(
        _cli(data_dir, "credentials", "create", "--name", "jsonuser", "--json").stdout
    )
    policy = tmp_path / "p.json"
    policy.write_text(
        '{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":"kms:*","Resource":"*"}]}'
    )
    set_out = _cli(data_dir, "credentials", "set-policy", "jsonuser", "--policy-file", str(policy),
                   "--json")  # fmt: skip
    assert json.loads(set_out.stdout) == {"Arn": made["Arn"], "HasPolicy": True}
    got = json.loads(_cli(data_dir, "credentials", "get-policy", "jsonuser", "--json").stdout)
    assert got["Policy"]["Statement"][0]["Action"] == "kms:*"
    deleted = json.loads(_cli(data_dir, "credentials", "delete", "jsonuser", "--json").stdout)
    assert deleted == {"Deleted": made["AccessKeyId"], "Arn": made["Arn"]}
    report = tmp_path / "r.json"
    assert _cli(data_dir, "report", "--out", str(report)).returncode == 0
    verified = json.loads(_cli(data_dir, "report", "verify", str(report), "--json").stdout)
    assert verified["Intact"] is True
    key = json.loads(_cli(data_dir, "report", "key", "--json").stdout)
    assert key["PublicKeyPem"].startswith("-----BEGIN PUBLIC KEY-----")
    assert verified["SignedBy"] == key["Fingerprint"]
    report.write_text(report.read_text().replace('"keys"', '"keyz"', 1))
    broken = _cli(data_dir, "report", "verify", str(report), "--json")
    assert broken.returncode == 1
    assert json.loads(broken.stdout)["Intact"] is False
