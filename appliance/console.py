"""
``engage-appliance``: the operator's command, one subcommand per task.

- ``webhooks list``: each webhook, what waits in its queue, and its receiver's last answer;
- ``webhooks test NAME``: post one sample batch with the webhook's credentials, print the answer;
- ``preview MESSAGE.eml``: what tracking would do to a message (``appliance.preview``);
- ``check``: the configuration and every file it names, without starting;
- ``suppressions list|add|remove|import``: the suppression list (``appliance.console_suppressions``);
- ``events``: search or follow the event log (``console_events``);
- ``stats``: counts per campaign from the statistics store, or rebuild it (``console_stats``);
- ``keys``, ``users``, ``certificate``, ``dkim-key``: the commands that were
  ``engage-appliance-keys`` and so on (those names still work), run as they were.

It reads the configuration the appliance runs with (``--config``) and the
queue directories it writes, never the running process: ``webhooks list`` works
while the appliance runs, and when it does not.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from datetime import UTC, datetime

from twisted.internet import defer, task
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure
from twisted.web.client import Agent
from twisted.web.iweb import IAgent

from appliance import console_events, console_queue, console_stats
from appliance.build import load_webhooks
from appliance.config import DEFAULT_CONFIG_PATH, Config, ConfigError, WebhookConfig, read_config, read_toml
from appliance.eventtypes import EVENT_TYPES
from appliance.webhooks import QueueDirectory, TrustFile
from appliance.webhooks.auth import TokenError
from appliance.webhooks.http import describe_failure
from appliance.webhooks.samples import Answer, post_test_batch

PROG = "engage-appliance"


def _keys(argv: list[str]) -> int:
    from appliance.links import keys_main

    return keys_main(argv)


def _users(argv: list[str]) -> int:
    from appliance.users import main

    return main(argv)


def _certificate(argv: list[str]) -> int:
    from appliance.tls import main

    return main(argv)


def _dkim_key(argv: list[str]) -> int:
    from appliance.dkim import main

    return main(argv)


def _preview(argv: list[str]) -> int:
    from appliance.preview.command import main

    return main(argv)


def _check(argv: list[str]) -> int:
    from appliance.console_check import main

    return main(argv)


def _suppressions(argv: list[str]) -> int:
    from appliance.console_suppressions import main

    return main(argv)


# The commands that came first, each with its own options: their arguments are passed on as given.
DELEGATED: dict[str, tuple[Callable[[list[str]], int], str]] = {
    "keys": (_keys, "create, rotate, retire and list the keys that encrypt and sign tracked links"),
    "users": (_users, "manage the SMTP AUTH users file"),
    "certificate": (_certificate, "write a self-signed TLS certificate and key"),
    "dkim-key": (_dkim_key, "make a DKIM key and print its DNS record"),
    # Not those, but commands with their own options all the same.
    "preview": (_preview, "show what tracking would do to a message, without sending it"),
    "check": (_check, "check the configuration and every file it names, without starting"),
    "suppressions": (_suppressions, "list, add, remove and import suppressed recipients"),
}


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog=PROG, description="Operate the engage appliance.")
    commands = top.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (_, text) in DELEGATED.items():
        commands.add_parser(name, help=f"{text} (see {PROG} {name} --help)", add_help=False)
    webhooks = commands.add_parser("webhooks", help="list the webhooks, or post a test batch to one",
                                   description="The webhooks of the configuration and their queues.")
    actions = webhooks.add_subparsers(dest="action", required=True, metavar="ACTION")
    listing = actions.add_parser(
        "list", help="each webhook, its queue depth, oldest batch and last answer",
        description="Each webhook: its target, what waits in its queue and the last answer of "
                    "its receiver, read from the queue directories (the appliance may be running).")
    testing = actions.add_parser(
        "test", help="post one sample batch to a webhook and print the answer",
        description="Post one batch holding a sample event of each type the webhook takes, marked "
                    "as samples the way SparkPost marks its own, with the webhook's credentials, "
                    "and print the receiver's answer. The batch is not queued or retried.")
    testing.add_argument("name", metavar="NAME", help="the webhook's name (see webhooks list)")
    for sub in (listing, testing):
        sub.add_argument("--config", "-c", default=DEFAULT_CONFIG_PATH, metavar="PATH",
                         help="the appliance's configuration file (default: %(default)s)")
    console_events.add_parser(commands)
    console_stats.add_parser(commands)
    console_queue.add_parser(commands)
    return top


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in DELEGATED:
        return DELEGATED[args[0]][0](args[1:])
    options = parser().parse_args(args)
    if options.command == "queue":
        return console_queue.main(options, PROG)
    try:
        config = _load(options.config)
        if options.command == "events":
            return console_events.run(options, config.events.log_file,
                                      lambda line: print(line, flush=options.follow))
        if options.command == "stats":
            return console_stats.run(options, config, print)
        if options.action == "list":
            print(webhooks_list(config, time.time()), end="")
            return 0
        hook = _webhook(config, options.name)
        [hook], trust = load_webhooks(_only(config, hook))
    except ConfigError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 2

    def run(reactor: IReactorTime) -> defer.Deferred:
        tls = {"contextFactory": TrustFile(trust[hook.name])} if hook.name in trust else {}
        agent = Agent(reactor, connectTimeout=hook.timeout, **tls)
        return webhooks_test(hook, agent, reactor, config.node.name, print)

    return _react(run)


def _react(run: Callable[[IReactorTime], defer.Deferred]) -> int:
    """Run ``run`` on the global reactor until its Deferred fires with the exit status."""

    def exit_with(status: int) -> None:
        raise SystemExit(status)

    try:
        task.react(lambda reactor: run(reactor).addCallback(exit_with))
    except SystemExit as e:
        return int(e.code or 0)
    return 0


def _load(path: str) -> Config:
    config, problems = read_config(read_toml(path), path)
    if problems:
        raise ConfigError(problems, path)
    return config


def _webhook(config: Config, name: str) -> WebhookConfig:
    for hook in config.webhooks:
        if hook.name == name:
            return hook
    names = ", ".join(h.name for h in config.webhooks) or "none is configured"
    raise ConfigError([("", f"no webhook named {name!r} ({names})")], config.source)


def _only(config: Config, hook: WebhookConfig) -> Config:
    """The configuration with only ``hook``: the other webhooks' secrets are not read."""
    return replace(config, webhooks=(hook,))


def _when(ts: float, now: float) -> str:
    at = datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%SZ")
    ago = max(int(now - ts), 0)
    hours, rest = divmod(ago, 3600)
    return f"{at} ({hours}h{rest // 60:02d}m ago)" if hours else f"{at} ({rest // 60}m{rest % 60:02d}s ago)"


def queue_of(config: Config, hook: WebhookConfig) -> QueueDirectory:
    """The webhook's queue directory, where ``appliance.service`` puts it."""
    return QueueDirectory(os.path.join(config.spool.directory, "webhooks", hook.name))


def webhooks_list(config: Config, now: float) -> str:
    """The text of ``webhooks list``: a block per webhook."""
    if not config.webhooks:
        return f"no webhooks in {config.source}\n"
    out = []
    for hook in config.webhooks:
        queue = queue_of(config, hook)
        status = queue.status()
        events = ", ".join(t for t in EVENT_TYPES if t in hook.events)
        out.append(f"{hook.name}\n  target:      {hook.target} (auth: {hook.auth_type})\n"
                   f"  events:      {events}\n")
        waiting = f"{status.batches} batch(es), {status.events} event(s)"
        if status.oldest is not None:
            waiting += f"; oldest sealed {_when(status.oldest, now)}"
        out.append(f"  queue:       {waiting}; {status.collecting} event(s) collecting\n")
        last = queue.last_answer()
        if last is None:
            out.append("  last answer: none yet\n")
        else:
            verdict = "accepted" if last.get("accepted") else "not accepted"
            out.append(f"  last answer: {last.get('answer')} ({verdict}, batch {last.get('batch_id')}, "
                       f"{_when(float(last.get('time', 0)), now)})\n")
    return "".join(out)


def webhooks_test(hook: WebhookConfig, agent: IAgent, clock: IReactorTime, node_name: str,
                  say: Callable[[str], object]) -> defer.Deferred:
    """Post the sample batch and ``say`` what came of it; fires with the exit status (0: 2xx)."""
    say(f"posting {len(hook.events)} sample event(s) to {hook.target} (auth: {hook.auth_type})")

    def answered(answer: Answer) -> int:
        say(f"HTTP {answer.code} {answer.phrase} (batch {answer.batch_id}, {answer.count} event(s))")
        if answer.body.strip():
            say(answer.body.rstrip())
        return 0 if 200 <= answer.code < 300 else 1

    def failed(failure: Failure) -> int:
        why = str(failure.value) if failure.check(TokenError) else describe_failure(failure)
        say(f"no answer: {why}")
        return 1

    return post_test_batch(hook, agent, clock, node_name).addCallbacks(answered, failed)


if __name__ == "__main__":
    sys.exit(main())
