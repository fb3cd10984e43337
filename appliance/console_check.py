"""
``engage-appliance check``: the configuration and every file it names, without starting.

What ``twistd engage-appliance`` would refuse to start with, all at once: the
configuration's own problems, each listener's endpoint as a start parses it,
then each file it names (certificates and
keys, CA bundles, DKIM keys, the users file, secrets, link keys, the admin
token, the policy hook) read as a start reads it, and the directories the
appliance writes. Files a first start would make (link keys, admin token,
self-signed certificate) are not made: only their directories are checked.
Exit status 0 when nothing is wrong, 1 otherwise, as ``postfix check``.
"""

from __future__ import annotations

import argparse
import os
import sys

from twisted.internet import endpoints

from appliance.build import Loaders, Problems, build, unwritable
from appliance.config import DEFAULT_CONFIG_PATH, Config, ConfigError, read_config, read_toml

PROG = "engage-appliance check"


def writable_directories(config: Config) -> Problems:
    """The directories the appliance writes into, each that it could not write into."""
    problems: Problems = []
    for where, directory in (("spool.directory", config.spool.directory),
                             ("events.log_file", os.path.dirname(config.events.log_file))):
        problem = unwritable(directory)
        if problem:
            problems.append((where, f"cannot write in {directory}: {problem}"))
    return problems


def listener_endpoints(config: Config) -> Problems:
    """
    Each listener's endpoint description parsed as the start parses it (nothing listens):
    a port that is no number, an unknown option, an ``ssl:`` key file that cannot be read.
    """
    named = [(f"smtp.listeners.{li.name}.endpoint", li.endpoint) for li in config.smtp.listeners]
    named.append(("tracker.endpoint", config.tracker.endpoint))
    if config.admin.endpoint:
        named.append(("admin.endpoint", config.admin.endpoint))
    problems: Problems = []
    for where, description in named:
        if not description or description.startswith("systemd:"):
            continue  # empty: reported already; systemd: only parses under socket activation
        try:
            # The reactor is only stored by the endpoint, never called while parsing.
            endpoints.serverFromString(object(), description)
        except Exception as e:
            problems.append((where, f"{description!r}: {e}"))
    return problems


def check(path: str) -> ConfigError | None:
    """Every problem of the configuration at ``path`` and of what it names; None when all is well."""
    try:
        config, problems = read_config(read_toml(path), path)
    except ConfigError as e:
        return e
    problems += writable_directories(config)
    problems += listener_endpoints(config)
    try:
        build(config, problems, Loaders(create_files=False))
    except ConfigError as e:
        return e
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Check the configuration and everything it names (keys, certificates, "
        "hook, users file, DKIM keys, directories) without starting; every problem is listed by its "
        "key path. Exit status: 0 when all is well, 1 otherwise.")
    parser.add_argument("--config", "-c", default=DEFAULT_CONFIG_PATH, metavar="PATH",
                        help="the appliance's configuration file (default: %(default)s)")
    options = parser.parse_args(argv)
    problem = check(options.config)
    if problem is not None:
        print(problem, file=sys.stderr)
        return 1
    print(f"{options.config}: configuration OK")
    return 0
