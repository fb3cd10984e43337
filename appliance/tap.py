"""``twistd engage-appliance``: command-line options and the service maker."""

from __future__ import annotations

from twisted.python import usage

from appliance.config import DEFAULT_CONFIG_PATH, Config, ConfigError, load_config
from appliance.links import KeyFileError, Keyring, prepare_keyring
from appliance.policy import Hook, PolicyError, load_hook
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

    config: Config
    keyring: Keyring
    policy_hook: Hook | None

    def postOptions(self) -> None:
        # Validate here, before twistd daemonizes, so a bad file fails the command itself.
        try:
            self.config = load_config(self["config"])
            links = self.config.links
            self.keyring = prepare_keyring(links.keys_file, links.create_keys_file)
            self.policy_hook = load_hook(self.config.policy.hook, self.config.policy.path)
        except (ConfigError, KeyFileError, PolicyError) as e:
            raise usage.UsageError(str(e)) from None


def makeService(options: Options) -> Appliance:
    return Appliance(options.config, keyring=options.keyring, policy_hook=options.policy_hook)
