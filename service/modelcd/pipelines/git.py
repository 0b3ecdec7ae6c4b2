"""Commit rendered pipeline files to the model's git repository and push them (GitPython).

``publish`` keeps one cache repository per repository URL under ``workdir`` (a bare
repository with ``origin`` set to the URL: the first call fetches everything, later calls
fetch what changed). It never checks the model's files out: the new commit is built with
plumbing (blobs, a temporary index, ``write-tree``, ``commit-tree``) on top of the branch's
tip, so a repository holding large model files costs one fetch and nothing more.

- The branch starts from ``origin/<branch>`` when it exists, else from
  ``origin/<base_branch>``. An *empty* remote (no branch at all) gets an empty
  "Initial commit" on ``base_branch`` first, so the pipeline branch shares history with the
  default branch (a pull request stays possible, and a hosting service makes
  ``base_branch``, not the pipeline branch, the default one). Publishing straight to
  ``base_branch`` of an empty remote makes the files the root commit. A non-empty remote
  without ``base_branch`` is an error naming the branches it has.
- Only files under ``.github/workflows/`` and ``azure-pipelines/`` (``ALLOWED_PREFIXES``)
  may be written; absolute paths, ``..``, backslashes, control characters, ``.git`` and
  any path crossing a symlink or a submodule of the branch are refused before anything is
  written (``field="path"``).
- Idempotent: files identical to the branch's make no commit and no push.
- A push rejected because the remote moved meanwhile is redone once on the new tip (the
  files are written again over it, so there is never a conflict); a second rejection fails.
- A token (https only) reaches git through a credential helper that reads it from the
  environment of that one git command: never in the URL, a config file, the log or an
  error message (every text from git goes through a redactor). Commits carry the
  target's author/committer identity whatever the machine's git configuration says.
- Two publishes to the same repository serialize on an ``fcntl`` lock next to the cache.
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import io
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote, urlsplit

import git
from git.objects.blob import Blob
from gitdb.base import IStream

from modelcd.errors import StageFailed

Log = Callable[[str], None]

ALLOWED_PREFIXES: tuple[str, ...] = (".github/workflows/", "azure-pipelines/")
"""Folders ``publish`` may write into; everything else in the model's repository is left alone."""

TOKEN_USERNAME = "x-access-token"
"""User name sent with a token when the URL names none (GitHub and Azure DevOps accept any)."""

INITIAL_MESSAGE = "Initial commit"
NETWORK_TIMEOUT = 300.0
"""Seconds one fetch or push may take before it is killed."""

_FILE_MODE = "100644"
_EXEC_MODE = "100755"
_MAX_TAIL = 8
_SCP_LIKE = re.compile(r"^[A-Za-z0-9._~-]+@[A-Za-z0-9.-]+:")
# A credential helper given as configuration (GIT_CONFIG_* variables, never a file): it
# answers "get" with the user name and the token from its own environment only.
_HELPER = ('!f() { test "$1" = get || return 0; '
           'printf "username=%s\\npassword=%s\\n" "$MODELCD_GIT_USERNAME" "$MODELCD_GIT_TOKEN"; }; f')


class GitError(StageFailed):
    """Publishing to a git repository failed; the message names the repository, the branch and the cause."""

    code = "git_failed"


@dataclass(frozen=True)
class RepoTarget:
    """Where pipeline files go: a repository, the branch to commit on, and who commits."""

    url: str
    """A local path, ``file://``, ``ssh://``/``user@host:path`` or ``https://`` URL (no credentials in it)."""
    branch: str
    """Branch to commit on, e.g. ``modelcd/pipelines``."""
    base_branch: str = "main"
    """Where a new branch starts from."""
    author_name: str = "modelcd"
    author_email: str = "modelcd@localhost"
    token: str | None = field(default=None, repr=False)
    """https only: resolved by the caller from an env var or secret file; sent for one git command at a time."""

    def __repr__(self) -> str:
        return (f"RepoTarget(url={display_url(self.url)!r}, branch={self.branch!r}, base_branch={self.base_branch!r}, "
                f"author={f'{self.author_name} <{self.author_email}>'!r}, token={'set' if self.token else None})")


@dataclass(frozen=True)
class PublishResult:
    """What ``publish`` did: the new commit (None when nothing changed) and whether it was pushed."""

    commit: str | None
    branch: str
    changed: list[str]
    pushed: bool


def publish(target: RepoTarget, files: Mapping[str, str], message: str, workdir: Path, log: Log,
            allowed_prefixes: Sequence[str] = ALLOWED_PREFIXES, lock_timeout: float = 600.0) -> PublishResult:
    """Commit ``files`` (relative path -> text) on ``target.branch`` and push it; no commit when nothing differs.

    Raises GitError with ``field`` set to the input at fault ("repo", "token", "branch",
    "base_branch", "author", "message", "path")."""
    paths = check_paths(files, allowed_prefixes)
    if not message.strip():
        raise GitError("the commit message is empty", field="message")
    session = _Session(target, workdir, log)
    with session.locked(lock_timeout):
        session.sync()
        for attempt in (1, 2):
            plan = session.plan(files, paths)
            if not plan.changed:
                log(f"no changes: {len(paths)} file(s) already up to date on {target.branch}")
                return PublishResult(commit=None, branch=target.branch, changed=[], pushed=False)
            log(f"files changed on {target.branch}: {', '.join(plan.changed)}")
            parent = plan.start
            if parent is None and plan.create_base:
                parent = session.commit(None, {}, INITIAL_MESSAGE)
                log(f"committed {parent} ({INITIAL_MESSAGE}) on {target.base_branch}: the remote is empty")
                if not session.push(parent, target.base_branch, attempt):
                    session.sync()
                    continue
            sha = session.commit(parent, plan.entries, message)
            log(f"committed {sha} on {target.branch}")
            if session.push(sha, target.branch, attempt):
                return PublishResult(commit=sha, branch=target.branch, changed=plan.changed, pushed=True)
            session.sync()
    raise AssertionError("unreachable: the second rejected push raises")  # pragma: no cover


def changed_files(target: RepoTarget, files: Mapping[str, str], workdir: Path, log: Log | None = None,
                  allowed_prefixes: Sequence[str] = ALLOWED_PREFIXES, lock_timeout: float = 600.0) -> list[str]:
    """The paths of ``files`` that ``publish`` would change on the branch (a ``--check``): fetches, never commits."""
    paths = check_paths(files, allowed_prefixes)
    session = _Session(target, workdir, log or (lambda _line: None))
    with session.locked(lock_timeout):
        session.sync()
        return session.plan(files, paths).changed


def check_paths(files: Mapping[str, str], allowed_prefixes: Sequence[str] = ALLOWED_PREFIXES) -> list[str]:
    """The sorted paths of ``files``; raises GitError(field="path") for a path that may not be written."""
    prefixes = tuple(p.strip("/") + "/" for p in allowed_prefixes)
    for path, text in files.items():
        check_path(path, prefixes)
        if not isinstance(text, str):
            raise GitError(f"the content of {path!r} is {type(text).__name__}, not text", field="path")
    return sorted(files)


def check_path(path: str, allowed_prefixes: Sequence[str] = ALLOWED_PREFIXES) -> str:
    """``path`` when it is a plain relative path under one of ``allowed_prefixes``; else GitError(field="path")."""

    def refuse(why: str) -> GitError:
        return GitError(f"pipeline file path {path!r} refused: {why}", field="path")

    if not isinstance(path, str) or not path:
        raise refuse("it is empty")
    if "\x00" in path or any(ord(c) < 0x20 or c == "\x7f" for c in path):
        raise refuse("it contains a NUL or control character")
    if "\\" in path:
        raise refuse("it contains a backslash; use / between folders")
    if path.startswith("/") or re.match(r"^[A-Za-z]:", path):
        raise refuse("it is absolute; give a path relative to the repository root")
    parts = path.split("/")
    if ".." in parts:
        raise refuse("it contains '..'")
    if any(part in ("", ".") for part in parts):
        raise refuse("it contains an empty or '.' component")
    if any(part.lower() == ".git" for part in parts):
        raise refuse("it goes into .git")
    prefixes = tuple(p.strip("/") + "/" for p in allowed_prefixes)
    if not any(path.startswith(prefix) for prefix in prefixes):
        raise refuse(f"only files under {', '.join(prefixes)} may be written")
    return path


def display_url(url: str) -> str:
    """``url`` without any user name or password, for logs and messages."""
    if "://" not in url:
        return url
    parts = urlsplit(url)
    netloc = parts.netloc.rpartition("@")[2]
    return parts._replace(netloc=netloc).geturl()


class Redactor:
    """Removes a secret (and its base64 / URL-encoded forms) from text shown to people."""

    def __init__(self, secret: str | None, username: str = TOKEN_USERNAME) -> None:
        forms: set[str] = set()
        if secret:
            forms = {secret, quote(secret, safe=""),
                     base64.b64encode(secret.encode()).decode(),
                     base64.b64encode(f"{username}:{secret}".encode()).decode()}
        self._forms = sorted(forms, key=len, reverse=True)

    def __call__(self, text: str) -> str:
        for form in self._forms:
            text = text.replace(form, "***")
        return text


@dataclass
class _Plan:
    start: str | None  # commit the new one goes on; None: a root commit
    create_base: bool  # empty remote: push an initial commit on base_branch first
    entries: dict[str, tuple[str, bytes]]  # path -> (mode, content) for the changed files
    changed: list[str]


class _Session:
    """One publish: the cache repository of ``target.url``, its git environment and its redactor."""

    def __init__(self, target: RepoTarget, workdir: Path, log: Log) -> None:
        self.target = target
        self.url = _check_target(target)
        self.shown = display_url(target.url)
        self.username = (urlsplit(self.url).username if "://" in self.url else None) or TOKEN_USERNAME
        self.redact = Redactor(target.token, self.username)
        self._log = log
        self.workdir = Path(workdir)
        digest = hashlib.sha256(self.url.encode()).hexdigest()[:16]
        slug = re.sub(r"[^A-Za-z0-9._-]+", "-", self.url.rstrip("/").rsplit("/", 1)[-1].removesuffix(".git"))
        self.cache = self.workdir / f"{slug.strip('.-')[:40] or 'repo'}-{digest}"
        self.env = self._environment()

    def log(self, line: str) -> None:
        self._log(self.redact(line))

    def fail(self, cause: str, field: str) -> GitError:
        return GitError(self.redact(f"git repository {self.shown} (branch {self.target.branch}): {cause}"),
                        field=field)

    def _environment(self) -> dict[str, str]:
        env = {"GIT_DIR": str(self.cache), "GIT_TERMINAL_PROMPT": "0", "GIT_ASKPASS": "", "SSH_ASKPASS": "",
               "GIT_AUTHOR_NAME": self.target.author_name, "GIT_AUTHOR_EMAIL": self.target.author_email,
               "GIT_COMMITTER_NAME": self.target.author_name, "GIT_COMMITTER_EMAIL": self.target.author_email,
               "GIT_SSH_COMMAND": os.environ.get("GIT_SSH_COMMAND") or "ssh -o BatchMode=yes"}
        config = [("core.hooksPath", os.devnull), ("gc.autoDetach", "false"), ("maintenance.autoDetach", "false")]
        if self.target.token:
            # An empty value drops every helper configured elsewhere (nothing may store the token).
            config += [("credential.helper", ""), ("credential.helper", _HELPER)]
            env["MODELCD_GIT_USERNAME"] = self.username
            env["MODELCD_GIT_TOKEN"] = self.target.token
        env["GIT_CONFIG_COUNT"] = str(len(config))
        for i, (key, value) in enumerate(config):
            env[f"GIT_CONFIG_KEY_{i}"] = key
            env[f"GIT_CONFIG_VALUE_{i}"] = value
        return env

    def git(self, *args: str, env: Mapping[str, str] | None = None, timeout: float | None = None,
            check: bool = True) -> tuple[int, str, str]:
        """Run ``git args`` in the cache; (status, stdout, stderr). Raises GitError unless ``check`` is False."""
        try:
            status, out, err = git.Git(str(self.cache)).execute(
                ["git", *args], env={**self.env, **(env or {})}, with_extended_output=True,
                with_exceptions=False, kill_after_timeout=timeout, stdout_as_string=True)
        except git.GitCommandNotFound as e:
            raise GitError("the git command is not installed", field="git") from e
        out, err = str(out or ""), str(err or "")
        if status != 0 and check:
            raise self.fail(f"git {args[0]} failed: {_tail(err or out)}", field="repo")
        return status, out, err

    @contextmanager
    def locked(self, timeout: float) -> Iterator[None]:
        """Hold the cache's lock file (fcntl): publishes to one repository run one after the other."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.cache.with_name(self.cache.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise self.fail(f"another publish holds the lock for over {timeout:g}s",
                                        field="repo") from None
                    time.sleep(0.05)
            yield
        finally:
            os.close(fd)

    def sync(self) -> None:
        """Create the cache on first use, then fetch every branch of origin."""
        fresh = not (self.cache / "HEAD").is_file() or self._origin() != self.url
        if fresh:
            shutil.rmtree(self.cache, ignore_errors=True)
            self.cache.mkdir(parents=True)
            self.git("init", "--quiet", "--bare")
            self.git("remote", "add", "origin", self.url)
        status, out, err = self.git("fetch", "--prune", "--no-tags", "--quiet", "origin",
                                    timeout=NETWORK_TIMEOUT, check=False)
        if status != 0:
            if fresh:
                shutil.rmtree(self.cache, ignore_errors=True)
            raise self.fail(_cause(err or out), field="repo")
        self.log(f"{'cloned' if fresh else 'fetched'} {self.shown}")

    def _origin(self) -> str | None:
        status, out, _ = self.git("config", "--get", "remote.origin.url", check=False)
        return out.strip() if status == 0 else None

    def _remote_tip(self, branch: str) -> str | None:
        status, out, _ = self.git("rev-parse", "--verify", "--quiet", f"refs/remotes/origin/{branch}^{{commit}}",
                                  check=False)
        return out.strip() if status == 0 else None

    def plan(self, files: Mapping[str, str], paths: list[str]) -> _Plan:
        """Where the commit starts and which of ``files`` differ from it."""
        branch, base = self.target.branch, self.target.base_branch
        start, create_base = self._remote_tip(branch), False
        if start is not None:
            self.log(f"branch {branch} at {start[:12]}")
        elif (start := self._remote_tip(base)) is not None:
            self.log(f"branch {branch} is new: starts from {base} at {start[:12]}")
        else:
            _, heads, _ = self.git("for-each-ref", "--format=%(refname:lstrip=3)", "refs/remotes/origin/")
            names = [h for h in heads.split() if h != "HEAD"]
            if names:
                raise self.fail(f"base branch {base!r} not found; the remote has {', '.join(sorted(names))}",
                                field="base_branch")
            create_base = branch != base
            self.log(f"the remote is empty: {branch} starts a new history"
                     + (f" on an initial commit of {base}" if create_base else ""))
        repo = git.Repo(str(self.cache), odbt=git.GitDB)
        try:
            tree = repo.commit(start).tree if start else None
            entries: dict[str, tuple[str, bytes]] = {}
            for path in paths:
                data = files[path].encode("utf-8")
                current = self._current(tree, path)
                if current is None:
                    entries[path] = (_FILE_MODE, data)
                elif current.data_stream.read() != data:
                    entries[path] = (_EXEC_MODE if current.mode & 0o111 else _FILE_MODE, data)
        finally:
            repo.close()
        return _Plan(start=start, create_base=create_base, entries=entries, changed=sorted(entries))

    def _current(self, tree: git.Tree | None, path: str) -> Blob | None:
        """The regular file at ``path`` in ``tree`` (None when absent); GitError when the path crosses a
        symlink, a submodule, a file where a folder is needed, or names a folder."""
        parts = path.split("/")
        for i, part in enumerate(parts):
            if tree is None:
                return None
            try:
                item = tree[part]
            except KeyError:
                return None
            where = "/".join(parts[: i + 1])
            last = i == len(parts) - 1
            if isinstance(item, Blob) and item.mode == Blob.link_mode:
                raise GitError(f"pipeline file path {path!r} refused: {where} is a symlink on branch "
                               f"{self.target.branch}", field="path")
            if item.type == "submodule":
                raise GitError(f"pipeline file path {path!r} refused: {where} is a submodule", field="path")
            if last:
                if not isinstance(item, Blob):
                    raise GitError(f"pipeline file path {path!r} refused: it is a folder", field="path")
                return item
            if not isinstance(item, git.Tree):
                raise GitError(f"pipeline file path {path!r} refused: {where} is a file, not a folder", field="path")
            tree = item
        return None  # pragma: no cover - the loop returns on its last part

    def commit(self, parent: str | None, entries: Mapping[str, tuple[str, bytes]], message: str) -> str:
        """A commit of ``parent``'s tree with ``entries`` written over it (a root commit when no parent)."""
        index = self.cache / f"modelcd-index-{os.getpid()}"
        env = {"GIT_INDEX_FILE": str(index)}
        repo = git.Repo(str(self.cache), odbt=git.GitDB)
        try:
            blobs = {path: repo.odb.store(IStream(Blob.type, len(data), io.BytesIO(data))).binsha.hex()
                     for path, (_mode, data) in entries.items()}
        finally:
            repo.close()
        try:
            self.git("read-tree", *([parent] if parent else ["--empty"]), env=env)
            if entries:
                cacheinfo = [f"{mode},{blobs[path]},{path}" for path, (mode, _data) in entries.items()]
                self.git("update-index", "--add", *(a for info in cacheinfo for a in ("--cacheinfo", info)), env=env)
            _, tree, _ = self.git("write-tree", env=env)
            _, sha, _ = self.git("commit-tree", "--no-gpg-sign", tree.strip(), *(["-p", parent] if parent else []),
                                 "-m", message, env=env)
        finally:
            index.unlink(missing_ok=True)
        return sha.strip()

    def push(self, sha: str, branch: str, attempt: int) -> bool:
        """Push ``sha`` to ``branch`` (fast-forward only). False when the remote moved on the first attempt."""
        status, out, err = self.git("push", "--porcelain", "--no-verify", "origin", f"{sha}:refs/heads/{branch}",
                                    timeout=NETWORK_TIMEOUT, check=False)
        if status == 0:
            self.log(f"pushed {branch} to {self.shown} at {sha[:12]}")
            return True
        rejected = [line.split("\t") for line in out.splitlines() if line.startswith("!\t")]
        if not rejected:
            raise self.fail(f"push failed: {_cause(err or out)}", field="repo")
        summary = rejected[0][-1]
        moved = ("[rejected]" in summary
                 or any(s in summary for s in ("failed to update ref", "cannot lock ref", "incorrect old value")))
        if not moved:
            raise self.fail(f"push of {branch} rejected by the remote: {summary}", field="branch")
        if attempt > 1:
            raise self.fail(f"push of {branch} rejected twice: the remote keeps moving ({summary})", field="branch")
        self.log(f"push of {branch} rejected ({summary}): someone pushed meanwhile; fetching and redoing the commit")
        return False


def _check_target(target: RepoTarget) -> str:
    """The URL git is given (local paths made absolute); GitError for a target that cannot be used."""
    url = target.url.strip() if isinstance(target.url, str) else ""
    shown = display_url(url)
    if not url:
        raise GitError("the repository URL is empty", field="repo")
    if url.startswith("-") or any(ord(c) < 0x20 or c == "\x7f" for c in url):
        raise GitError(f"repository URL {shown!r} is not a URL or a path", field="repo")
    if "://" in url:
        parts = urlsplit(url)
        if parts.scheme not in ("https", "http", "ssh", "file", "git"):
            raise GitError(f"repository URL {shown!r}: scheme {parts.scheme!r} is not supported", field="repo")
        if parts.password is not None:
            raise GitError(f"repository URL {shown!r} carries a password; give it as the token instead", field="repo")
    elif not _SCP_LIKE.match(url):
        url = str(Path(url).expanduser().absolute())
    if target.token is not None and not url.startswith("https://"):
        raise GitError(f"a token is only sent over https, not to {shown}", field="token")
    for name, value in (("branch", target.branch), ("base_branch", target.base_branch)):
        if not isinstance(value, str) or not _valid_branch(value):
            raise GitError(f"{value!r} is not a valid branch name", field=name)
    for value in (target.author_name, target.author_email):
        if not value.strip() or any(c in value for c in "<>\n\r\x00"):
            raise GitError(f"author {value!r} is not a valid git identity part", field="author")
    return url


def _valid_branch(name: str) -> bool:
    """git check-ref-format rules for ``refs/heads/<name>``, plus: not an option, not HEAD."""
    if not name or name.startswith("-") or name == "HEAD":
        return False
    status, _, _ = git.Git().execute(["git", "check-ref-format", f"refs/heads/{name}"], with_extended_output=True,
                                     with_exceptions=False)
    return status == 0


def _tail(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return " / ".join(lines[-_MAX_TAIL:]) or "no output"


_CAUSES: tuple[tuple[tuple[str, ...], str], ...] = (
    (("authentication failed", "could not read username", "could not read password", "invalid username or password",
      "access denied", "permission denied", "requested url returned error: 401", "requested url returned error: 403"),
     "authentication failed"),
    (("repository not found", "does not appear to be a git repository", "not found",
      "requested url returned error: 404", "no such file or directory"), "repository not found"),
    (("could not resolve host", "failed to connect", "couldn't connect", "connection refused", "timed out",
      "timeout:", "network is unreachable", "ssl", "certificate"), "repository unreachable"),
)


def _cause(stderr: str) -> str:
    """A short cause for a failed fetch or push, followed by git's last lines (the caller redacts)."""
    low = stderr.lower()
    for needles, cause in _CAUSES:
        if any(n in low for n in needles):
            return f"{cause}: {_tail(stderr)}"
    return _tail(stderr)
