"""
The shipped etc/appliance.toml documents every key the appliance accepts.

Operators learn the configuration from that file, so a key that appliance.config
reads but the file never mentions is a setting nobody can find. The keys are
taken from appliance.config's readers themselves (each ``Table`` getter records the
key it read), so a new key without documentation fails here with no list to
keep up to date.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from appliance import config
from appliance.config import ConfigError, load_config, parse_config
from tests.helpers import SHIPPED_CONFIG

# The name a table of operator-chosen names (listeners) gets here; the shipped file's
# prose calls such tables [smtp.listeners.NAME] too.
NAME = "NAME"


def accepted_keys(patch: Any) -> tuple[dict[str, set[str]], set[str]]:
    """
    Every key appliance.config's readers accept, by table path (``smtp.listeners.NAME``, ``webhooks``),
    and the paths of the tables whose keys are names the operator chooses.

    One table of every optional kind is given, empty, so every reader runs and
    asks for each of its keys; the errors of the empty tables do not matter.
    """
    tables: list[config.Table] = []

    class Recording(config.Table):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            tables.append(self)

    patch(config, "Table", Recording)
    try:
        parse_config({"smtp": {"listeners": {NAME: {"smtpapi": {}}}}, "webhooks": [{}], "dkim": {}})
    except ConfigError:
        pass
    keys: dict[str, set[str]] = {}
    named: set[str] = set()
    for t in tables:
        path = re.sub(r"\[\d+\]", "", t.path)
        if NAME in t.known:
            named.add(path)
        keys.setdefault(path, set()).update(t.known - {NAME})
    return keys, named


_HEADER = re.compile(r"#?\s*\[\[?\s*([A-Za-z0-9_.-]+)\s*\]\]?\s*(#.*)?")
_KEY = re.compile(r"(#\s*)?([A-Za-z0-9_]+)\s*=(.*)")


@dataclass
class Documentation:
    """What the file says, by table path: keys it sets and keys it shows in comments."""

    keys: dict[str, set[str]] = field(default_factory=dict)
    headers: set[str] = field(default_factory=set)
    text: str = ""
    uncommented: list[str] = field(default_factory=list)  # key lines with no comment near them


def _normal(path: str, named: set[str]) -> str:
    """``smtp.listeners.default`` -> ``smtp.listeners.NAME``: one path for all named tables."""
    parts = path.split(".")
    for i in range(len(parts) - 1):
        if ".".join(parts[: i + 1]) in named:
            parts[i + 1] = NAME
    return ".".join(parts)


def _is_prose(line: str) -> bool:
    body = line.lstrip("#").strip()
    return line.startswith("#") and bool(body) and not _HEADER.fullmatch(line) and not _KEY.fullmatch(line)


def _has_inline_comment(rest: str) -> bool:
    return bool(re.search(r"\s#\s*\S", rest))


def read_documentation(text: str, named: set[str]) -> Documentation:
    """
    Split the file at its table headers, commented-out ones (``# [dkim]``) included.

    A key counts as documented in the table whose section holds its line,
    whether it is set (``key = value``) or shown (``# key = value``), and only
    with a comment: on its line, or in its paragraph (the lines around it up
    to a blank line).
    """
    doc = Documentation(text=text)
    lines = text.splitlines()
    paragraphs: list[int] = []
    number = 0
    for line in lines:
        number += not line.strip()
        paragraphs.append(number)
    has_prose = {paragraphs[i] for i, line in enumerate(lines) if _is_prose(line.strip())}
    section = ""
    for i, raw in enumerate(lines):
        line = raw.strip()
        header = _HEADER.fullmatch(line)
        if header:
            section = _normal(header.group(1), named)
            doc.headers.add(section)
            continue
        key = _KEY.fullmatch(line)
        if not key:
            continue
        doc.keys.setdefault(section, set()).add(key.group(2))
        if not (_has_inline_comment(key.group(3)) or paragraphs[i] in has_prose):
            doc.uncommented.append(f"{section}.{key.group(2)}")
    return doc


def undocumented(accepted: dict[str, set[str]], doc: Documentation) -> list[str]:
    """
    The accepted keys the file does not document, as ``table.key``.

    A table's key may also be documented by a table it sits in (a listener's
    ``relay_networks`` and ``tls`` are described under ``[smtp]``, whose
    values it inherits), and a nested table named like a top-level one
    (``[smtp.listeners.NAME.smtpapi]``) reads that table's keys and shares
    its documentation. A table itself is documented by its header, or by its
    name in brackets in the prose.
    """
    tables = set(accepted)
    missing = []
    for path, keys in sorted(accepted.items()):
        parts = path.split(".") if path else []
        candidates = [".".join(parts[:n]) for n in range(len(parts), 0, -1)]
        if len(parts) > 1 and parts[-1] in tables:
            candidates.append(parts[-1])
        for key in sorted(keys):
            full = f"{path}.{key}" if path else key
            if full in tables:
                documented = (any(h == full or h.startswith(f"{full}.") for h in doc.headers)
                              or f"[{full}]" in doc.text
                              or any(key in doc.keys.get(c, set()) for c in candidates))
            else:
                documented = any(key in doc.keys.get(c, set()) for c in candidates)
            if not documented:
                missing.append(full)
    return missing


class ShippedFileDocumentsEveryKeyTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.accepted, self.named = accepted_keys(self.patch)
        with open(SHIPPED_CONFIG, encoding="utf-8") as f:
            self.text = f.read()

    def test_keys_come_from_the_readers(self) -> None:
        """Every kind of table was read, so the check below sees every key."""
        self.assertIn("require_auth", self.accepted["smtp.listeners.NAME"])
        self.assertEqual(self.accepted["smtp.listeners.NAME.smtpapi"], self.accepted["smtpapi"])
        self.assertIn("retry_lifetime", self.accepted["webhooks"])
        self.assertIn("selector", self.accepted["dkim"])
        self.assertIn("max_messages_per_connection", self.accepted["delivery"])
        self.assertLessEqual({"node", "smtp", "delivery", "webhooks", "dkim"}, self.accepted[""])
        self.assertEqual(self.named, {"smtp.listeners"})

    def test_shipped_file_is_valid(self) -> None:
        load_config(SHIPPED_CONFIG)

    def test_every_key_is_documented(self) -> None:
        doc = read_documentation(self.text, self.named)
        self.assertEqual(undocumented(self.accepted, doc), [])

    def test_every_key_line_has_a_comment(self) -> None:
        self.assertEqual(read_documentation(self.text, self.named).uncommented, [])

    def test_a_key_documented_only_in_another_table_is_missing(self) -> None:
        """delivery's retry_max is missing even though [[webhooks]] shows a retry_max of its own."""
        text = "\n".join(line for line in self.text.splitlines() if not line.startswith("retry_max"))
        missing = undocumented(self.accepted, read_documentation(text, self.named))
        self.assertEqual(missing, ["delivery.retry_max"])

    def test_a_new_key_is_missing(self) -> None:
        self.accepted["tracker"].add("backlog")
        self.accepted["webhooks"].add("compression")
        missing = undocumented(self.accepted, read_documentation(self.text, self.named))
        self.assertEqual(missing, ["tracker.backlog", "webhooks.compression"])

    def test_a_key_without_a_comment_is_reported(self) -> None:
        doc = read_documentation("[spool]\n\ndirectory = \"var/spool\"\n\n[events]\n"
                                 "# The log.\nlog_file = \"x\"\n# customer_id = \"1\"\n", self.named)
        self.assertEqual(doc.uncommented, ["spool.directory"])
        self.assertEqual(doc.keys, {"spool": {"directory"}, "events": {"log_file", "customer_id"}})
