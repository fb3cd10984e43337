"""
``engage-appliance preview MESSAGE.eml``: the command around ``make_preview``.

Exit status: 0 with a preview; 1 when the message gives none (unreadable,
refused by its ``X-MSYS-API`` header or by the policy hook, no HTML part);
2 for a wrong command line or configuration.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from email.utils import parseaddr
from typing import Any

from twisted.internet import defer, task
from twisted.logger import (
    FileLogObserver,
    FilteringLogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    formatEvent,
    globalLogPublisher,
)

from appliance.config import DEFAULT_CONFIG_PATH, Config, ConfigError, ListenerConfig, read_config, read_toml
from appliance.policy import ACCEPT, Policy, PolicyEnvelope, PolicyError, Verdict, load_hook
from appliance.preview import (
    PreviewError,
    headers_of,
    make_preview,
    read_message,
    recipient_of,
    with_msys_api,
)
from appliance.preview.report import render_text

PROG = "engage-appliance preview"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Show what tracking would do to a message, without sending it: every link "
                    "found (tracked or left alone, and why), where the pixels go, the settings "
                    "that won and where each came from, and (with --out) the recipient's copy.")
    p.add_argument("message", metavar="MESSAGE.eml", help="the message, headers and body")
    p.add_argument("--rcpt", metavar="ADDRESS", help="the recipient (default: the first To: address)")
    p.add_argument("--mail-from", metavar="ADDRESS",
                   help="the envelope sender the policy hook sees (default: the From: address)")
    p.add_argument("--listener", metavar="NAME",
                   help="the SMTP listener it is injected on (default: the first one)")
    p.add_argument("--x-msys-api", metavar="JSON",
                   help="use this X-MSYS-API header instead of the message's own")
    p.add_argument("--out", metavar="FILE", help="write the recipient's copy here")
    p.add_argument("--json", action="store_true", help="print the preview as one JSON object")
    p.add_argument("--config", "-c", default=DEFAULT_CONFIG_PATH, metavar="PATH",
                   help="the appliance's configuration file (default: %(default)s)")
    return p


def _listener(config: Config, name: str | None) -> ListenerConfig:
    if name is None:
        return config.smtp.listeners[0]
    for listener in config.smtp.listeners:
        if listener.name == name:
            return listener
    names = ", ".join(listener.name for listener in config.smtp.listeners)
    raise ConfigError([("", f"no SMTP listener named {name!r} ({names})")], config.source)


def ask_policy(config: Config, envelope: PolicyEnvelope, headers: Any,
               react: Callable[[Callable[[Any], defer.Deferred]], Any] = task.react) -> Verdict:
    """The policy hook's answer for the recipient, as the injection server would get it."""
    hook = load_hook(config.policy.hook, config.policy.path)
    if hook is None:
        return ACCEPT
    answer: list[Verdict] = []
    # What the hook logs (and its failures) is shown, as the appliance's log would show it.
    observer = FilteringLogObserver(
        FileLogObserver(sys.stderr, lambda event: f"policy: {formatEvent(event)}\n"),
        [LogLevelFilterPredicate(LogLevel.warn)])
    globalLogPublisher.addObserver(observer)

    def ask(reactor: Any) -> defer.Deferred:
        policy = Policy(hook, config.policy.timeout, reactor, config.engagement_tracker.max_metadata_len)
        return policy.check(envelope, "127.0.0.1", None, headers).addCallback(answer.append)

    try:
        react(ask)
    except SystemExit as e:
        if e.code:
            raise
    finally:
        globalLogPublisher.removeObserver(observer)
    return answer[0]


def main(argv: Sequence[str] | None = None) -> int:
    options = parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        toml = read_toml(options.config)
        config, problems = read_config(toml, options.config)
        if problems:
            raise ConfigError(problems, options.config)
        listener = _listener(config, options.listener)
    except ConfigError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 2
    try:
        message, reading_notes = read_message(options.message)
        if options.x_msys_api is not None:
            message = with_msys_api(message, options.x_msys_api)
            reading_notes.append("X-MSYS-API: the one given with --x-msys-api")
        headers = headers_of(message)
        rcpt = options.rcpt or recipient_of(headers)
        if not rcpt:
            raise PreviewError("the message has no To: address: give the recipient with --rcpt")
        mail_from = options.mail_from or parseaddr(str(headers.get("From", "")))[1]
        now = time.time()
        envelope = PolicyEnvelope(mail_from, rcpt, (rcpt,), "0", listener.name, "preview", False)
        try:
            verdict = ask_policy(config, envelope, headers)
        except PolicyError as e:
            print(f"{PROG}: {e}", file=sys.stderr)
            return 2
        preview = make_preview(message, config, toml, listener, rcpt, verdict, now)
        if options.out:
            try:
                with open(options.out, "wb") as f:
                    f.write(preview.copy)
            except OSError as e:
                raise PreviewError(f"cannot write {options.out}: {e.strerror}") from None
    except PreviewError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 1
    if options.json:
        out = preview.to_json()
        out["notes"] = reading_notes + out["notes"]
        out["out"] = options.out
        print(json.dumps(out, ensure_ascii=False, indent=2))
    else:
        print(render_text(preview, options.out, reading_notes), end="")
    return 0
