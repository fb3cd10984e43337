"""``twistd engage-appliance``: command-line options and the service maker."""

from __future__ import annotations

from twisted.python import usage

from appliance.build import Parts, load
from appliance.config import DEFAULT_CONFIG_PATH, ConfigError
from appliance.service import Appliance


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

    return Appliance(options.parts, reactor)
