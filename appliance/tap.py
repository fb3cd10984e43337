"""``twistd engage-appliance``: command-line options and the service maker."""

from __future__ import annotations

import signal

from twisted.logger import Logger
from twisted.python import logfile, usage

from appliance.build import Parts, load
from appliance.config import DEFAULT_CONFIG_PATH, ConfigError
from appliance.service import Appliance

log = Logger()


class Options(usage.Options):
    synopsis = "[-c CONFIG]"
    longdesc = (
        "Runs the engage appliance: ESMTP injection with engagement tracking, "
        "a durable spool, outbound delivery, the HTTP tracker and the event log."
    )
    optParameters = [
        ["config", "c", DEFAULT_CONFIG_PATH, "Path of the TOML configuration file."],
    ]

    parts: Parts

    def postOptions(self) -> None:
        # Check and load every file here, before twistd daemonizes, so a bad
        # configuration or a missing key fails the command itself.
        try:
            self.parts = load(self["config"])
        except ConfigError as e:
            raise usage.UsageError(str(e)) from None


def makeService(options: Options) -> Appliance:
    # The one place that picks the global reactor; everything below is handed it.
    from twisted.internet import reactor

    appliance = Appliance(options.parts, reactor)
    if appliance.sighup is not None:
        appliance.sighup.add(reopen_twistd_log)
    # twistd opens its log after this returns, and before the reactor runs.
    reactor.callWhenRunning(rotate_twistd_log_externally)
    return appliance


def twistd_log_file() -> logfile.LogFile | None:
    """
    twistd's own log file (``-l FILE``), or None when it logs elsewhere (stdout, syslog).

    twistd keeps no public reference to it: the one it keeps is in the SIGUSR1
    handler it installs for that file (``twisted.scripts._twistd_unix.UnixAppLogger``),
    which is where this finds it. tests/test_operating.py holds the Twisted in use to it.
    """
    handler = signal.getsignal(signal.SIGUSR1) if hasattr(signal, "SIGUSR1") else None
    for cell in getattr(handler, "__closure__", None) or ():
        try:
            value = cell.cell_contents
        except ValueError:  # an empty cell
            continue
        if isinstance(value, logfile.LogFile):
            return value
    return None


def rotate_twistd_log_externally() -> None:
    """
    Turn off twistd's own rotation of its log at 1 MB: it would rename the file under
    logrotate (etc/logrotate.d/engage-appliance), which rotates it as the event log,
    by rename and SIGHUP. ``kill -USR1`` still rotates it by hand.
    """
    log_file = twistd_log_file()
    if log_file is not None:
        log_file.rotateLength = None


def reopen_twistd_log() -> None:
    """On SIGHUP, reopen twistd's log file, which logrotate has renamed."""
    log_file = twistd_log_file()
    if log_file is None:
        return
    log_file.reopen()
    log.info("reopened twistd's log file {path}", path=log_file.path)
