"""
The admin token: the password of user ``admin`` on the admin listener.

It lives in a file of its own (``admin.token_file``), made on the first
start with a random token and readable by its owner only, like the link
keys; the ``engage-appliance`` commands read the same file to call the API.
"""

from __future__ import annotations

import os
import secrets

from twisted.logger import Logger

from appliance.files import write_atomically

log = Logger()

USER = "admin"


def read_token(path: str) -> str:
    """The token in ``path``; ``ValueError`` with a reason an operator can act on."""
    try:
        with open(path, encoding="ascii") as f:
            token = f.read().strip()
    except FileNotFoundError:
        raise ValueError(f"no such file: {path}") from None
    except (OSError, UnicodeError) as e:
        raise ValueError(f"cannot read {path}: {e}") from None
    if not token or any(c.isspace() for c in token):
        raise ValueError(f"{path} must hold one token on one line")
    return token


def prepare_token(path: str, create: bool = True) -> str:
    """The token in ``path``; a missing file is made with a new token when ``create``."""
    if create and not os.path.exists(path):
        try:
            write_atomically(path, (secrets.token_urlsafe(32) + "\n").encode("ascii"), 0o600)
        except OSError as e:
            raise ValueError(f"cannot create {path}: {e.strerror}") from None
        log.info("created the admin token file {path} (user {user}, the token as password)",
                 path=path, user=USER)
    return read_token(path)
