"""
SMTP AUTH users: the users file, its password hashes, and the cred checker the server asks.

The file has one user per line, ``name:hash``, where the hash is a PHC-style
scrypt string, ``$scrypt$ln=15,r=8,p=1$<salt>$<key>`` (unpadded base64).
scrypt is salted and deliberately slow and memory-hungry, so a stolen file
is expensive to attack; checking one password costs tens of milliseconds,
which is why the checker runs it in a thread, never on the reactor.
Blank lines and lines starting with ``#`` are ignored.

The checker re-reads the file when it changes, so users added with
``engage-appliance-users`` can log in without a restart. A changed file that
cannot be read keeps the users it had, and says so in the log.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import getpass
import hashlib
import hmac
import os
import re
import secrets
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.cred import credentials, error
from twisted.cred.checkers import ICredentialsChecker
from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from appliance.files import write_atomically

log = Logger()

DEFAULT_COST = 15  # log2 of scrypt's N: 32 MiB and some tens of milliseconds per check
_HASH_RE = re.compile(r"\$scrypt\$ln=(\d+),r=(\d+),p=(\d+)\$([A-Za-z0-9+/]+)\$([A-Za-z0-9+/]+)")
_NAME_RE = re.compile(r"[^\s:\x00-\x1f\x7f]{1,255}")


@dataclass(frozen=True)
class ScryptHash:
    cost: int  # log2(N)
    block_size: int  # r
    parallelism: int  # p
    salt: bytes
    key: bytes

    def encode(self) -> str:
        salt = base64.b64encode(self.salt).decode().rstrip("=")
        key = base64.b64encode(self.key).decode().rstrip("=")
        return f"$scrypt$ln={self.cost},r={self.block_size},p={self.parallelism}${salt}${key}"

    @classmethod
    def parse(cls, text: str) -> ScryptHash:
        m = _HASH_RE.fullmatch(text)
        if not m:
            raise ValueError("expected a hash like $scrypt$ln=15,r=8,p=1$salt$key")
        ln, r, p = (int(x) for x in m.group(1, 2, 3))
        # Bounds keep a hand-edited file from making every login take minutes or gigabytes.
        if not (4 <= ln <= 20 and 1 <= r <= 32 and 1 <= p <= 16):
            raise ValueError(f"scrypt parameters out of range: ln={ln}, r={r}, p={p}")
        try:
            salt, key = (base64.b64decode(x + "=" * (-len(x) % 4)) for x in m.group(4, 5))
        except binascii.Error:
            raise ValueError("salt or key is not base64") from None
        if len(salt) < 8 or len(key) < 16:
            raise ValueError("salt or key too short")
        return cls(ln, r, p, salt, key)

    def derive(self, password: bytes) -> bytes:
        n, r, p = 1 << self.cost, self.block_size, self.parallelism
        return hashlib.scrypt(password, salt=self.salt, n=n, r=r, p=p, dklen=len(self.key),
                              maxmem=128 * r * (n + p + 2) + (1 << 20))

    def verify(self, password: bytes) -> bool:
        return hmac.compare_digest(self.derive(password), self.key)


def hash_password(password: bytes, cost: int = DEFAULT_COST) -> str:
    template = ScryptHash(cost, 8, 1, secrets.token_bytes(16), b"\0" * 32)
    return ScryptHash(cost, 8, 1, template.salt, template.derive(password)).encode()


def check_name(name: str) -> str:
    if not _NAME_RE.fullmatch(name):
        raise ValueError(f"not a valid user name: {name!r} (no spaces, colons or control characters)")
    return name


def parse_users(text: str) -> dict[str, ScryptHash]:
    """The users of a file's text; ValueError names the line of the first problem."""
    users: dict[str, ScryptHash] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, hashed = line.partition(":")
        try:
            if not sep:
                raise ValueError("expected name:hash")
            check_name(name)
            if name in users:
                raise ValueError(f"user {name!r} appears twice")
            users[name] = ScryptHash.parse(hashed)
        except ValueError as e:
            raise ValueError(f"line {number}: {e}") from None
    return users


def read_users(path: str) -> dict[str, ScryptHash]:
    return load_users(path).users


Stamp = tuple[int, int, int]


@dataclass(frozen=True)
class UsersTable:
    """The users of one read of the file, and the file's identity then (to see it change)."""

    stamp: Stamp
    users: dict[str, ScryptHash]


def load_users(path: str) -> UsersTable:
    """Read and parse the users file; ``ValueError`` says what is wrong with it."""
    try:
        with open(path, encoding="utf-8") as f:
            st = os.fstat(f.fileno())
            text = f.read()
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not UTF-8") from None
    return UsersTable((st.st_ino, st.st_size, st.st_mtime_ns), parse_users(text))


@implementer(ICredentialsChecker)
class UsersFileChecker:
    """A ``twisted.cred`` checker for ``IUsernamePassword`` against the users file."""

    credentialInterfaces = (credentials.IUsernamePassword,)

    def __init__(self, path: str, run: Callable[..., defer.Deferred],
                 table: UsersTable | None = None) -> None:
        """``run`` runs a scrypt check off the reactor thread; ``table`` is the file as read at start-up."""
        self.path = path
        self.run = run
        self._stamp: Stamp | None = None
        self._users: dict[str, ScryptHash] = {}
        # Unknown names are checked against this, so a refusal takes as long either way.
        self._decoy = ScryptHash.parse(hash_password(secrets.token_bytes(8)))
        if table is None:
            self.reload()
        else:
            self._take(table)

    def _take(self, table: UsersTable) -> None:
        self._users = table.users
        self._stamp = table.stamp
        if self._users:
            self._decoy = next(iter(self._users.values()))

    def reload(self) -> None:
        """Read the file if it changed since the last read."""
        try:
            st = os.stat(self.path)
        except OSError as e:
            log.error("users file {path} cannot be read ({e}); keeping {n} known user(s)",
                      path=self.path, e=e.strerror, n=len(self._users))
            return
        stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
        if stamp == self._stamp:
            return
        try:
            table = load_users(self.path)
        except ValueError as e:
            log.error("users file {path}: {e}; keeping {n} known user(s)",
                      path=self.path, e=str(e), n=len(self._users))
            return
        self._take(table)

    def requestAvatarId(self, creds: Any) -> defer.Deferred:
        """Fires with the user name, or fails with ``UnauthorizedLogin``."""
        self.reload()
        name = creds.username.decode("utf-8", "replace") if isinstance(creds.username, bytes) \
            else creds.username
        password = creds.password.encode() if isinstance(creds.password, str) else creds.password
        known = self._users.get(name)
        d = self.run((known or self._decoy).verify, password)

        def decide(ok: bool) -> str:
            if ok and known is not None:
                return name
            raise error.UnauthorizedLogin()

        return d.addCallback(decide)


# -- engage-appliance-users ---------------------------------------------------------


def _rewrite(path: str, update: Callable[[list[str]], list[str]]) -> None:
    """Apply ``update`` to the file's lines and replace it atomically, owner-readable only."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        lines = ["# engage-appliance SMTP AUTH users: name:scrypt-hash, one per line.",
                 "# Edit with engage-appliance-users."]
    new = update(lines)
    parse_users("\n".join(new))  # never write a file the appliance would refuse
    write_atomically(path, ("\n".join(new) + "\n").encode("utf-8"), 0o600)


def _name_of(line: str) -> str | None:
    line = line.strip()
    if not line or line.startswith("#"):
        return None
    return line.partition(":")[0]


def set_user(path: str, name: str, password: bytes, cost: int = DEFAULT_COST) -> bool:
    """Add the user or change its password; True if it was new."""
    check_name(name)
    entry = f"{name}:{hash_password(password, cost)}"
    found = False

    def update(lines: list[str]) -> list[str]:
        nonlocal found
        out = []
        for line in lines:
            if _name_of(line) == name:
                found = True
                out.append(entry)
            else:
                out.append(line)
        return out if found else out + [entry]

    _rewrite(path, update)
    return not found


def remove_user(path: str, name: str) -> bool:
    found = False

    def update(lines: list[str]) -> list[str]:
        nonlocal found
        out = [line for line in lines if _name_of(line) != name]
        found = len(out) != len(lines)
        return out

    if not os.path.exists(path):
        return False
    _rewrite(path, update)
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="engage-appliance-users",
        description="Manage the SMTP AUTH users file (smtp.users_file). The appliance "
                    "picks up changes without a restart.",
    )
    parser.add_argument("--file", default="var/users",
                        help="the users file (default: %(default)s)")
    sub = parser.add_subparsers(dest="command", required=True)
    add = sub.add_parser("add", help="add a user, or set the password of an existing one")
    add.add_argument("name")
    add.add_argument("--password-stdin", action="store_true",
                     help="read the password from the first line of standard input")
    add.add_argument("--cost", type=int, default=DEFAULT_COST,
                     help="log2 of scrypt's N (default: %(default)s)")
    rm = sub.add_parser("remove", help="remove a user")
    rm.add_argument("name")
    sub.add_parser("list", help="list user names")
    args = parser.parse_args(argv)

    try:
        if args.command == "list":
            for name in read_users(args.file):
                print(name)
            return 0
        if args.command == "remove":
            if not remove_user(args.file, args.name):
                print(f"engage-appliance-users: no user {args.name!r}", file=sys.stderr)
                return 1
            print(f"removed {args.name}")
            return 0
        check_name(args.name)
        if not 4 <= args.cost <= 20:
            raise ValueError("--cost must be from 4 to 20")
        if args.password_stdin:
            password = sys.stdin.readline().rstrip("\r\n")
        else:
            password = getpass.getpass(f"Password for {args.name}: ")
            if getpass.getpass("Again: ") != password:
                raise ValueError("the passwords differ")
        if not password:
            raise ValueError("empty password")
        new = set_user(args.file, args.name, password.encode("utf-8"), args.cost)
        print(f"{'added' if new else 'changed the password of'} {args.name} in {args.file}")
        return 0
    except (OSError, ValueError) as e:
        print(f"engage-appliance-users: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
