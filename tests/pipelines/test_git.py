"""modelcd.pipelines.git against real repositories: bare remotes in tmp_path, a second clone
pushing meanwhile, and a real https remote on 127.0.0.1 (``git http-backend`` behind TLS and
Basic auth) for the token. No git call is mocked; the user's git configuration is not read."""

from __future__ import annotations

import base64
import datetime
import ipaddress
import os
import ssl
import subprocess
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from modelcd.pipelines.git import (
    TOKEN_USERNAME,
    GitError,
    RepoTarget,
    changed_files,
    check_path,
    publish,
)
from modelcd.targets.process import free_port

BRANCH = "modelcd/pipelines"
WORKFLOW = ".github/workflows/release.yml"
AZURE = "azure-pipelines/release.yml"
FILES = {WORKFLOW: "name: release\non: push\n", AZURE: "trigger: none\n"}
TOKEN = "ghp_S3cretT0kenValue0123456789abcdef"
SEED_ENV = {"GIT_AUTHOR_NAME": "Seed", "GIT_AUTHOR_EMAIL": "seed@example.invalid",
            "GIT_COMMITTER_NAME": "Seed", "GIT_COMMITTER_EMAIL": "seed@example.invalid"}


@pytest.fixture(autouse=True)
def git_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No global or system git configuration, no identity, no proxy: loopback only."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", os.devnull)
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    for name in ("GIT_AUTHOR_NAME", "GIT_AUTHOR_EMAIL", "GIT_COMMITTER_NAME", "GIT_COMMITTER_EMAIL", "EMAIL",
                 "GIT_DIR", "GIT_WORK_TREE", "GIT_INDEX_FILE", "GIT_CONFIG_COUNT",
                 "http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")


def run(*args: str, cwd: Path | None = None) -> str:
    """A git command of the test itself (seed and competing clones), with its own identity."""
    done = subprocess.run(["git", *args], cwd=cwd, env={**os.environ, **SEED_ENV}, capture_output=True, text=True,
                          timeout=30)
    assert done.returncode == 0, f"git {' '.join(args)}: {done.stderr}"
    return done.stdout.strip()


def tip(remote: Path, branch: str) -> str | None:
    done = subprocess.run(["git", "--git-dir", str(remote), "rev-parse", "--verify", "--quiet",
                           f"refs/heads/{branch}"], capture_output=True, text=True)
    return done.stdout.strip() or None


def show(remote: Path, rev: str, fmt: str) -> str:
    return run("--git-dir", str(remote), "log", "-1", f"--format={fmt}", rev)


def blob(remote: Path, branch: str, path: str) -> str:
    return run("--git-dir", str(remote), "show", f"{branch}:{path}")


def commit_on(remote: Path, tmp: Path, branch: str, path: str, text: str, symlink: str | None = None) -> str:
    """Another clone commits ``path`` on ``branch`` (creating it from main if needed) and pushes: the new tip."""
    clone = tmp / f"other-{len(list(tmp.glob('other-*')))}"
    run("clone", "--quiet", str(remote), str(clone))
    run("checkout", "--quiet", "-B", branch, f"origin/{branch}" if tip(remote, branch) else "origin/main", cwd=clone)
    target = clone / path
    target.parent.mkdir(parents=True, exist_ok=True)
    if symlink is not None:
        target.symlink_to(symlink)
    else:
        target.write_text(text)
    run("add", "--all", cwd=clone)
    run("commit", "--quiet", "-m", f"other: {path}", cwd=clone)
    run("push", "--quiet", "origin", f"HEAD:refs/heads/{branch}", cwd=clone)
    return run("rev-parse", "HEAD", cwd=clone)


@pytest.fixture
def empty_remote(tmp_path: Path) -> Path:
    remote = tmp_path / "empty.git"
    run("init", "--quiet", "--bare", str(remote))
    return remote


@pytest.fixture
def remote(tmp_path: Path) -> Path:
    """A bare remote whose main branch holds one commit (README.md), made from a normal clone."""
    remote = tmp_path / "model.git"
    run("init", "--quiet", "--bare", str(remote))
    seed = tmp_path / "seed"
    run("init", "--quiet", "-b", "main", str(seed))
    (seed / "README.md").write_text("# model\n")
    run("add", "README.md", cwd=seed)
    run("commit", "--quiet", "-m", "seed", cwd=seed)
    run("push", "--quiet", str(remote), "main:main", cwd=seed)
    return remote


class Lines(list[str]):
    def __call__(self, line: str) -> None:
        self.append(line)


def test_first_publish_creates_the_branch_with_one_commit_and_the_given_author(remote: Path, tmp_path: Path) -> None:
    main = tip(remote, "main")
    log = Lines()
    target = RepoTarget(url=str(remote), branch=BRANCH, author_name="Release Bot", author_email="bot@example.invalid")
    result = publish(target, FILES, "Add release pipelines", tmp_path / "work", log)
    assert result.pushed and result.branch == BRANCH and result.changed == sorted(FILES)
    assert result.commit == tip(remote, BRANCH)
    assert show(remote, BRANCH, "%P|%an|%ae|%cn|%ce|%s") == f"{main}|Release Bot|bot@example.invalid|" \
                                                           "Release Bot|bot@example.invalid|Add release pipelines"
    for path, text in FILES.items():
        assert blob(remote, BRANCH, path) == text.rstrip("\n")
    assert blob(remote, BRANCH, "README.md") == "# model"  # the branch keeps main's files
    assert tip(remote, "main") == main
    text = "\n".join(log)
    assert "cloned" in text and "committed" in text and f"pushed {BRANCH}" in text


def test_same_files_again_make_no_commit_and_no_push(remote: Path, tmp_path: Path) -> None:
    target = RepoTarget(url=str(remote), branch=BRANCH)
    first = publish(target, FILES, "pipelines", tmp_path / "work", Lines())
    log = Lines()
    again = publish(target, dict(FILES), "pipelines", tmp_path / "work", log)
    assert (again.commit, again.changed, again.pushed) == (None, [], False)
    assert tip(remote, BRANCH) == first.commit
    assert "fetched" in log[0] and not any("pushed" in line for line in log)
    assert changed_files(target, FILES, tmp_path / "work") == []
    # A fresh cache (another machine) agrees.
    assert publish(target, FILES, "pipelines", tmp_path / "work2", Lines()).commit is None


def test_changing_one_file_makes_exactly_one_commit_touching_it(remote: Path, tmp_path: Path) -> None:
    target = RepoTarget(url=str(remote), branch=BRANCH)
    first = publish(target, FILES, "pipelines", tmp_path / "work", Lines())
    changed = {**FILES, AZURE: "trigger:\n  - main\n"}
    assert changed_files(target, changed, tmp_path / "work") == [AZURE]
    assert tip(remote, BRANCH) == first.commit  # the check committed nothing
    second = publish(target, changed, "update azure", tmp_path / "work", Lines())
    assert second.changed == [AZURE] and second.pushed
    assert show(remote, BRANCH, "%P") == first.commit
    assert run("--git-dir", str(remote), "diff-tree", "--no-commit-id", "--name-only", "-r", BRANCH) == AZURE
    assert blob(remote, BRANCH, AZURE) == "trigger:\n  - main"


def test_a_new_branch_starts_from_the_tip_of_main(remote: Path, tmp_path: Path) -> None:
    target = RepoTarget(url=str(remote), branch=BRANCH)
    publish(target, FILES, "pipelines", tmp_path / "work", Lines())  # the cache exists and is now behind
    main = commit_on(remote, tmp_path, "main", "model.txt", "v2\n")
    result = publish(RepoTarget(url=str(remote), branch="modelcd/other"), FILES, "other", tmp_path / "work", Lines())
    assert show(remote, "modelcd/other", "%P") == main
    assert result.changed == sorted(FILES)
    with pytest.raises(GitError) as e:
        publish(RepoTarget(url=str(remote), branch="modelcd/x", base_branch="develop"), FILES, "m",
                tmp_path / "work", Lines())
    assert e.value.field == "base_branch" and "develop" in e.value.message and "main" in e.value.message


def test_an_empty_remote_gets_an_initial_commit_on_main_then_the_branch(empty_remote: Path, tmp_path: Path) -> None:
    target = RepoTarget(url=f"file://{empty_remote}", branch=BRANCH)
    result = publish(target, FILES, "pipelines", tmp_path / "work", Lines())
    main = tip(empty_remote, "main")
    assert main and show(empty_remote, "main", "%P|%s|%an") == "|Initial commit|modelcd"
    assert run("--git-dir", str(empty_remote), "ls-tree", "main") == ""
    assert show(empty_remote, BRANCH, "%P") == main and result.commit == tip(empty_remote, BRANCH)
    assert publish(target, FILES, "pipelines", tmp_path / "work", Lines()).commit is None


def test_publishing_to_the_base_branch_of_an_empty_remote_makes_a_root_commit(empty_remote: Path,
                                                                               tmp_path: Path) -> None:
    result = publish(RepoTarget(url=str(empty_remote), branch="main"), FILES, "pipelines", tmp_path / "w", Lines())
    assert result.commit == tip(empty_remote, "main")
    assert show(empty_remote, "main", "%P|%s") == "|pipelines"
    assert run("--git-dir", str(empty_remote), "rev-list", "--count", "--all") == "1"


@pytest.mark.parametrize("path", ["../x", "/etc/x", "src/x.py", ".github/workflows/../../x", "", ".github/workflows/",
                                  ".github/workflows//x.yml", ".github/workflows\\x.yml", "azure-pipelines/a\x00b",
                                  "azure-pipelines/.git/config", "./azure-pipelines/x.yml", "C:/azure-pipelines/x",
                                  ".github/workflows/x\n.yml", ".github/workflowsx.yml"])
def test_bad_paths_are_refused_before_anything_is_written(empty_remote: Path, tmp_path: Path, path: str) -> None:
    target = RepoTarget(url=str(empty_remote), branch=BRANCH)
    with pytest.raises(GitError) as e:
        publish(target, {**FILES, path: "x"}, "m", tmp_path / "work", Lines())
    assert e.value.field == "path" and repr(path) in e.value.message
    with pytest.raises(GitError):
        changed_files(target, {path: "x"}, tmp_path / "work")
    assert run("--git-dir", str(empty_remote), "for-each-ref") == "" and not (tmp_path / "work").exists()
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(("where", "link"), [(".github/workflows", "../src"), (".github", "elsewhere"),
                                             (AZURE, "/etc/passwd")])
def test_a_path_through_a_symlink_of_the_branch_is_refused(remote: Path, tmp_path: Path, where: str,
                                                           link: str) -> None:
    commit_on(remote, tmp_path, BRANCH, where, "", symlink=link)
    before = tip(remote, BRANCH)
    with pytest.raises(GitError) as e:
        publish(RepoTarget(url=str(remote), branch=BRANCH), FILES, "m", tmp_path / "work", Lines())
    assert e.value.field == "path" and "symlink" in e.value.message and where in e.value.message
    assert tip(remote, BRANCH) == before


def test_a_push_rejected_because_another_clone_pushed_is_redone_on_the_new_tip(remote: Path, tmp_path: Path) -> None:
    target = RepoTarget(url=str(remote), branch=BRANCH)
    first = publish(target, FILES, "pipelines", tmp_path / "work", Lines())
    others: list[str] = []

    def log(line: str) -> None:  # between our commit and our push, someone else pushes
        lines.append(line)
        if line.startswith("committed") and not others:
            others.append(commit_on(remote, tmp_path, BRANCH, "azure-pipelines/other.yml", "other: 1\n"))

    lines: list[str] = []
    result = publish(target, {**FILES, WORKFLOW: "name: v2\n"}, "v2", tmp_path / "work", log)
    assert result.pushed and result.changed == [WORKFLOW] and result.commit == tip(remote, BRANCH)
    assert show(remote, BRANCH, "%P|%s") == f"{others[0]}|v2"  # redone on the other clone's commit
    assert show(remote, others[0], "%P") == first.commit
    assert blob(remote, BRANCH, "azure-pipelines/other.yml") == "other: 1"
    assert blob(remote, BRANCH, WORKFLOW) == "name: v2"
    assert any("rejected" in line for line in lines)


def test_a_push_rejected_twice_fails_naming_repository_and_branch(remote: Path, tmp_path: Path) -> None:
    target = RepoTarget(url=str(remote), branch=BRANCH)
    publish(target, FILES, "pipelines", tmp_path / "work", Lines())
    pushed: list[str] = []

    def log(line: str) -> None:
        if line.startswith("committed"):
            pushed.append(commit_on(remote, tmp_path, BRANCH, f"azure-pipelines/o{len(pushed)}.yml", "o\n"))

    with pytest.raises(GitError) as e:
        publish(target, {WORKFLOW: "name: v2\n"}, "v2", tmp_path / "work", log)
    assert e.value.field == "branch" and "rejected" in e.value.message
    assert str(remote) in e.value.message and BRANCH in e.value.message
    assert tip(remote, BRANCH) == pushed[-1] and len(pushed) == 2


def test_concurrent_publishes_to_one_repository_serialize(remote: Path, tmp_path: Path) -> None:
    target = RepoTarget(url=str(remote), branch=BRANCH)
    results: dict[str, object] = {}

    def one(path: str) -> None:
        lines = Lines()
        try:
            results[path] = (publish(target, {path: f"{path}\n"}, path, tmp_path / "work", lines), lines)
        except Exception as e:  # reported below
            results[path] = e

    threads = [threading.Thread(target=one, args=(p,)) for p in (WORKFLOW, AZURE)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    for path in (WORKFLOW, AZURE):
        assert isinstance(results[path], tuple), results[path]
        result, lines = results[path]
        assert result.pushed and not any("rejected" in line for line in lines)
        assert blob(remote, BRANCH, path) == path
    assert run("--git-dir", str(remote), "rev-list", "--count", f"main..{BRANCH}") == "2"


def test_a_wrong_url_gives_a_clear_error_naming_it(tmp_path: Path) -> None:
    for url in (str(tmp_path / "nowhere.git"), f"file://{tmp_path}/nowhere.git"):
        with pytest.raises(GitError) as e:
            publish(RepoTarget(url=url, branch=BRANCH), FILES, "m", tmp_path / "work", Lines())
        assert e.value.field == "repo" and url in e.value.message and "not found" in e.value.message
        assert BRANCH in e.value.message
    assert list((tmp_path / "work").glob("*.git")) == [] and not [p for p in (tmp_path / "work").iterdir()
                                                                    if p.is_dir()]


@pytest.mark.parametrize(("target", "field"), [
    (RepoTarget(url="https://bot:hunter2@127.0.0.1:9/x.git", branch=BRANCH), "repo"),
    (RepoTarget(url="/tmp/x.git", branch=BRANCH, token="hunter2"), "token"),
    (RepoTarget(url="http://127.0.0.1:9/x.git", branch=BRANCH, token="hunter2"), "token"),
    (RepoTarget(url="--upload-pack=touch /tmp/modelcd-pwned", branch=BRANCH), "repo"),
    (RepoTarget(url="/tmp/x.git", branch="bad..name"), "branch"),
    (RepoTarget(url="/tmp/x.git", branch="-f"), "branch"),
    (RepoTarget(url="/tmp/x.git", branch=BRANCH, base_branch="main~1"), "base_branch"),
    (RepoTarget(url="/tmp/x.git", branch=BRANCH, author_name="a <b>"), "author"),
])
def test_unusable_targets_are_refused(tmp_path: Path, target: RepoTarget, field: str) -> None:
    with pytest.raises(GitError) as e:
        publish(target, FILES, "m", tmp_path / "work", Lines())
    assert e.value.field == field and "hunter2" not in e.value.message
    assert "hunter2" not in repr(target)


def test_a_token_never_shows_in_logs_or_errors_when_the_host_is_unreachable(tmp_path: Path) -> None:
    url = f"https://127.0.0.1:{free_port()}/org/model.git"  # nobody listens there
    log = Lines()
    with pytest.raises(GitError) as e:
        publish(RepoTarget(url=url, branch=BRANCH, token=TOKEN), FILES, "m", tmp_path / "work", log)
    assert e.value.field == "repo" and url in e.value.message and "unreachable" in e.value.message
    for text in (str(e.value), e.value.message, repr(e.value), *log):
        assert TOKEN not in text and base64.b64encode(TOKEN.encode()).decode() not in text
    assert_nowhere(tmp_path / "work", TOKEN)


def assert_nowhere(folder: Path, secret: str) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path


# A real https remote: TLS with a certificate for 127.0.0.1, Basic auth, git http-backend.


class GitHttpServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, root: Path, password: str) -> None:
        super().__init__(("127.0.0.1", 0), GitHttpHandler)
        self.root, self.password, self.seen = root, password, []


class GitHttpHandler(BaseHTTPRequestHandler):
    server: GitHttpServer

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        self.serve()

    def do_POST(self) -> None:
        self.serve()

    def body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() != "chunked":
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))
        data = b""
        while size := int(self.rfile.readline().split(b";")[0], 16):
            data += self.rfile.read(size)
            self.rfile.readline()
        self.rfile.readline()
        return data

    def serve(self) -> None:
        auth = self.headers.get("Authorization") or ""
        self.server.seen.append(auth)
        expected = base64.b64encode(f"{TOKEN_USERNAME}:{self.server.password}".encode()).decode()
        if auth != f"Basic {expected}":
            self.send_response(401)
            self.send_header("WWW-Authenticate", 'Basic realm="git"')
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        path, _, query = self.path.partition("?")
        data = self.body()
        env = {**os.environ, "GIT_PROJECT_ROOT": str(self.server.root), "GIT_HTTP_EXPORT_ALL": "1",
               "PATH_INFO": path, "QUERY_STRING": query, "REQUEST_METHOD": self.command,
               "CONTENT_TYPE": self.headers.get("Content-Type", ""), "CONTENT_LENGTH": str(len(data)),
               "REMOTE_USER": TOKEN_USERNAME, "REMOTE_ADDR": "127.0.0.1",
               "GIT_PROTOCOL": self.headers.get("Git-Protocol", ""),
               "HTTP_CONTENT_ENCODING": self.headers.get("Content-Encoding", "")}
        out = subprocess.run(["git", "http-backend"], input=data, env=env, capture_output=True, timeout=30).stdout
        head, _, payload = out.partition(b"\r\n\r\n")
        status, headers = 200, []
        for line in head.decode().split("\r\n"):
            name, _, value = line.partition(":")
            if name.lower() == "status":
                status = int(value.split()[0])
            elif name:
                headers.append((name, value.strip()))
        self.send_response(status)
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


@pytest.fixture
def https_remote(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, GitHttpServer]]:
    """``https://127.0.0.1:<port>/model.git`` (an empty bare repository) that wants TOKEN as password."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(key, hashes.SHA256()))
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    monkeypatch.setenv("GIT_SSL_CAINFO", str(cert_file))  # git verifies the server against this certificate
    root = tmp_path / "srv"
    run("init", "--quiet", "--bare", str(root / "model.git"))
    server = GitHttpServer(root, TOKEN)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_file, key_file)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"https://127.0.0.1:{server.server_address[1]}/model.git", server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def test_a_token_authenticates_over_https_and_is_stored_nowhere(
        https_remote: tuple[str, GitHttpServer], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    url, server = https_remote
    # A hostile global configuration: a helper that would store credentials, signing, hooks, no default identity.
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "pre-push").write_text("#!/bin/sh\nexit 1\n")
    (hooks / "pre-push").chmod(0o755)
    config = tmp_path / "gitconfig"
    store = tmp_path / "stored-credentials"
    config.write_text(f"[credential]\n\thelper = store --file {store}\n[commit]\n\tgpgSign = true\n"
                      f"[user]\n\tuseConfigOnly = true\n[core]\n\thooksPath = {hooks}\n")
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", str(config))
    log = Lines()
    target = RepoTarget(url=url, branch=BRANCH, token=TOKEN)
    result = publish(target, FILES, "pipelines", tmp_path / "work", log)
    assert result.pushed and result.commit == tip(server.root / "model.git", BRANCH)
    basic = "Basic " + base64.b64encode(f"{TOKEN_USERNAME}:{TOKEN}".encode()).decode()
    assert basic in server.seen  # the token did reach the server, as a Basic password
    assert publish(target, FILES, "pipelines", tmp_path / "work", log).commit is None
    assert changed_files(target, {WORKFLOW: "changed\n"}, tmp_path / "work") == [WORKFLOW]
    assert not any(TOKEN in line for line in log)
    assert not store.exists()
    assert_nowhere(tmp_path / "work", TOKEN)
    assert TOKEN not in repr(target)

    wrong = "ghp_Wr0ngT0kenValue0123456789abcdef"
    with pytest.raises(GitError) as e:
        publish(RepoTarget(url=url, branch=BRANCH, token=wrong), FILES, "m", tmp_path / "work2", log)
    assert e.value.field == "repo" and "authentication failed" in e.value.message and url in e.value.message
    assert wrong not in str(e.value) and not any(wrong in line for line in log)
    assert_nowhere(tmp_path / "work2", wrong)
    assert not store.exists()


def test_check_path_accepts_plain_paths_under_the_allowed_folders() -> None:
    assert check_path(".github/workflows/release.yml") == ".github/workflows/release.yml"
    assert check_path("azure-pipelines/ci/release.yml") == "azure-pipelines/ci/release.yml"
    assert check_path("deploy/x.yml", allowed_prefixes=("deploy",)) == "deploy/x.yml"
