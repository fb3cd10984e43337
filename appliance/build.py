"""
From a checked configuration to the ready objects the services run on.

``appliance.config`` checks the TOML's shape and values; this module opens the files
it names (certificates and keys, CA bundles, DKIM keys, the users file, the
link keyring, the policy hook), each once, and reports every problem with its
key path in one ``ConfigError``, together with the configuration's own. The
services receive what is built here and never read these files themselves.
``tap.py`` builds before twistd daemonizes, so a missing key fails the command.

Tests may pass their own ``Loaders``, as Tahoe-LAFS's ``create_client_from_config``
takes factories.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from twisted.internet import ssl
from twisted.logger import Logger

from appliance.admin.token import prepare_token
from appliance.config import Config, ConfigError, WebhookConfig, read_config, read_toml
from appliance.dkim import PrivateKey, Signer, SigningKey, load_private_key, weakness
from appliance.engagement.geo import GeoIP, open_geoip
from appliance.engagement.networks import EMPTY, Networks, read_networks
from appliance.links import KeyFileError, Keyring, new_keyring, prepare_keyring
from appliance.policy import Hook, PolicyError, load_hook
from appliance.suppression import SuppressionError, check_database
from appliance.tls import load_server_options, load_trust_root, write_pair
from appliance.users import UsersTable, load_users

log = Logger()

Problems = list[tuple[str, str]]


def read_secret(path: str) -> str:
    """A secret kept in a file of its own (a password), without its line end."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().rstrip("\r\n")
    except (OSError, UnicodeError) as e:
        raise ValueError(f"cannot read {path}: {e}") from None


@dataclass(frozen=True)
class Loaders:
    """How each kind of file is read; every one raises with a reason an operator can act on."""

    server_options: Callable[[str, str], ssl.CertificateOptions] = load_server_options
    trust_root: Callable[[str], ssl.IOpenSSLTrustRoot] = load_trust_root
    private_key: Callable[[str], PrivateKey] = load_private_key
    users: Callable[[str], UsersTable] = load_users
    keyring: Callable[[str, bool], Keyring] = prepare_keyring
    hook: Callable[[str, Sequence[str]], Hook | None] = load_hook
    secret: Callable[[str], str] = read_secret
    admin_token: Callable[[str, bool], str] = prepare_token
    # False for ``engage-appliance check``: files a start would make (link keys, admin
    # token, certificate) are only checked to be makeable, and every loader runs
    # even when others failed, so one run lists every problem.
    create_files: bool = True
    suppression: Callable[[str], None] = check_database
    networks: Callable[[str], Networks] = read_networks
    geoip: Callable[[str], GeoIP] = open_geoip


@dataclass(frozen=True)
class Parts:
    """The configuration (its secrets filled in) and everything read from the files it names."""

    config: Config  # the smarthost's password and the webhooks' secrets read from their files
    keyring: Keyring
    policy_hook: Hook | None = None
    listener_tls: Mapping[str, ssl.CertificateOptions] = field(default_factory=dict)  # by listener name
    delivery_trust: ssl.IOpenSSLTrustRoot | None = None  # tls_ca_file's roots; None: the platform's
    webhook_trust: Mapping[str, ssl.IOpenSSLTrustRoot] = field(default_factory=dict)  # by webhook name
    signer: Signer | None = None
    users: UsersTable | None = None
    admin_token: str | None = None  # None: no admin listener (admin.endpoint is "")
    prefetch_networks: Networks = EMPTY  # engagement_tracker.prefetch_networks_file's
    geoip: GeoIP | None = None  # engagement_tracker.geoip_database, opened


def build(config: Config, problems: Problems | None = None, loaders: Loaders = Loaders()) -> Parts:
    """
    Load every file ``config`` names; raise one ``ConfigError`` with ``problems`` and
    those of the files. The keyring (which may be created) and the policy hook (whose
    module runs when imported) are only prepared when everything else is right.
    """
    problems = list(problems or [])
    delivery = config.delivery
    if delivery.smarthost_password_file:
        password = _load(problems, "delivery.smarthost_password_file", loaders.secret,
                         delivery.smarthost_password_file)
        if password is not None:
            config = replace(config, delivery=replace(delivery, smarthost_password=password))
    listener_tls = _listener_tls(config, problems, loaders)
    delivery_trust = None
    ca = config.delivery.tls_ca_file
    if ca and not os.path.isfile(ca):
        problems.append(("delivery.tls_ca_file", f"no such file: {ca}"))
    elif ca:
        delivery_trust = _load(problems, "delivery.tls_ca_file", loaders.trust_root, ca)
    webhooks, webhook_trust = _webhooks(config.webhooks, problems, loaders)
    config = replace(config, webhooks=webhooks)
    signer = _signer(config, problems, loaders)
    users = None
    if config.smtp.users_file:
        users = _load(problems, "smtp.users_file", loaders.users, config.smtp.users_file)
    prefetch_networks, geoip = _engagement(config, problems, loaders)
    keyring: Keyring | None = None
    policy_hook = None
    admin_token = None
    if not problems or not loaders.create_files:
        keyring = _keyring(config, problems, loaders)
        if config.admin.endpoint:
            token = _made_file(problems, "admin.token_file", loaders.admin_token,
                               config.admin.token_file, True, loaders.create_files)
            admin_token = None if token is _TO_BE_MADE else token
        _suppression(config.suppression.database, problems, loaders)
        try:
            policy_hook = loaders.hook(config.policy.hook, config.policy.path)
        except PolicyError as e:
            problems.append(("", str(e)))  # the message names policy.hook itself
    if problems or keyring is None:
        raise ConfigError(problems, config.source)
    return Parts(config=config, keyring=keyring, policy_hook=policy_hook, listener_tls=listener_tls,
                 delivery_trust=delivery_trust, webhook_trust=webhook_trust, signer=signer, users=users,
                 admin_token=admin_token, prefetch_networks=prefetch_networks, geoip=geoip)


def _suppression(database: str, problems: Problems, loaders: Loaders) -> None:
    """The suppression database is made if missing, as the keyring; ``check`` makes nothing."""
    if not loaders.create_files and not os.path.exists(database):
        problem = unwritable(os.path.dirname(database) or ".")
        if problem:
            problems.append(("suppression.database", f"{database} cannot be created: {problem}"))
        return
    try:
        loaders.suppression(database)
    except SuppressionError as e:
        problems.append(("suppression.database", str(e)))


def _keyring(config: Config, problems: Problems, loaders: Loaders) -> Keyring | None:
    try:
        keyring = _made_file(problems, "links.keys_file", loaders.keyring, config.links.keys_file,
                             config.links.create_keys_file, loaders.create_files)
    except KeyFileError as e:
        problems.append(("links.keys_file", str(e)))
        return None
    return new_keyring() if keyring is _TO_BE_MADE else keyring


_TO_BE_MADE: Any = object()


def _made_file(problems: Problems, where: str, loader: Callable[[str, bool], Any], path: str,
               create: bool, may_create: bool) -> Any:
    """
    What ``loader`` reads from ``path``, a file a start makes when it is missing and ``create``.

    Without ``may_create`` a missing file is not made: its directory must let it be
    (``_TO_BE_MADE``), or the problem is recorded.
    """
    if create and not may_create and not os.path.exists(path):
        problem = unwritable(os.path.dirname(path))
        if problem:
            problems.append((where, f"{path} cannot be created: {problem}"))
            return None
        return _TO_BE_MADE
    return _load(problems, where, loader, path, create)


def unwritable(directory: str) -> str | None:
    """Why the appliance could not create files in ``directory`` (made if missing), or None."""
    path = os.path.abspath(directory)
    while not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    if not os.path.isdir(path):
        return f"{path} is not a directory"
    if not os.access(path, os.W_OK | os.X_OK):
        return f"{path} is not writable"
    return None


def build_from_toml(data: dict[str, Any], source: str = "", loaders: Loaders = Loaders()) -> Parts:
    """Check parsed TOML and build from it; one ``ConfigError`` holds every problem."""
    config, problems = read_config(data, source)
    return build(config, problems, loaders)


def load(path: str, loaders: Loaders = Loaders()) -> Parts:
    """Read, check and build the configuration file at ``path``."""
    return build_from_toml(read_toml(path), path, loaders)


def load_webhooks(config: Config, loaders: Loaders = Loaders()
                  ) -> tuple[tuple[WebhookConfig, ...], dict[str, ssl.IOpenSSLTrustRoot]]:
    """
    The webhooks with their secrets read, and their trust roots by name: what a command
    that posts on its own (``engage-appliance webhooks test``) needs, and nothing else.
    """
    problems: Problems = []
    webhooks, trust = _webhooks(config.webhooks, problems, loaders)
    if problems:
        raise ConfigError(problems, config.source)
    return webhooks, trust


def _webhooks(webhooks: tuple[WebhookConfig, ...], problems: Problems, loaders: Loaders
              ) -> tuple[tuple[WebhookConfig, ...], dict[str, ssl.IOpenSSLTrustRoot]]:
    """Each webhook with its password or client secret filled in, and its tls_ca_file's roots."""
    filled = []
    trust = {}
    for hook in webhooks:
        where = hook.where or "webhooks"
        if hook.tls_ca_file:
            root = _load(problems, f"{where}.tls_ca_file", loaders.trust_root, hook.tls_ca_file)
            if root is not None:
                trust[hook.name] = root
        if hook.auth_password_file:
            password = _load(problems, f"{where}.auth_password_file", loaders.secret,
                             hook.auth_password_file)
            if password is not None:
                hook = replace(hook, auth_password=password)
        if hook.auth_client_secret_file:
            secret = _load(problems, f"{where}.auth_client_secret_file", loaders.secret,
                           hook.auth_client_secret_file)
            if secret is not None:
                hook = replace(hook, auth_client_secret=secret)
        filled.append(hook)
    return tuple(filled), trust


def _engagement(config: Config, problems: Problems, loaders: Loaders) -> tuple[Networks, GeoIP | None]:
    """The prefetch networks and the MaxMind database the tracker classifies and places hits with."""
    c = config.engagement_tracker
    networks = EMPTY
    if c.prefetch_networks_file:
        networks = _load(problems, "engagement_tracker.prefetch_networks_file", loaders.networks,
                         c.prefetch_networks_file) or EMPTY
    geoip = None
    if c.geoip_database:
        geoip = _load(problems, "engagement_tracker.geoip_database", loaders.geoip, c.geoip_database)
    return networks, geoip


def _load(problems: Problems, where: str, loader: Callable[..., Any], *args: str) -> Any:
    try:
        return loader(*args)
    except ValueError as e:  # DkimError is one too
        problems.append((where, str(e)))
        return None


def _create_certificate(config: Config, problems: Problems, create: bool = True) -> None:
    """
    ``smtp.create_certificate``: the first start makes a self-signed pair for
    ``node.hostname`` (the key readable by its owner only), so STARTTLS is offered
    out of the box, as Debian's Postfix does with its snake-oil certificate.
    """
    certificate, key = config.smtp.tls_certificate, config.smtp.tls_key
    if os.path.exists(certificate) and os.path.exists(key):
        return
    if not create:
        problem = unwritable(os.path.dirname(key)) or unwritable(os.path.dirname(certificate))
        if problem:
            problems.append(("smtp.create_certificate", f"cannot create {certificate} and {key}: {problem}"))
        return
    try:
        os.makedirs(os.path.dirname(key), mode=0o700, exist_ok=True)
        write_pair(certificate, key, config.node.hostname, days=825, force=True)
    except OSError as e:
        problems.append(("smtp.create_certificate", f"cannot create {certificate} and {key}: {e.strerror}"))
        return
    log.info("created a self-signed certificate for {host} in {certificate} (smtp.create_certificate); "
             "set smtp.tls_certificate and smtp.tls_key to use another", host=config.node.hostname,
             certificate=certificate)


def _listener_tls(config: Config, problems: Problems, loaders: Loaders) -> dict[str, ssl.CertificateOptions]:
    """
    TLS options per listener. A pair shared by several listeners is loaded once,
    and its problem is named where the pair is set: ``smtp`` or the listener.
    """
    smtp = config.smtp
    loaded: dict[tuple[str, str], ssl.CertificateOptions | None] = {}

    def pair(certificate: str, key: str, where: str) -> ssl.CertificateOptions | None:
        if (certificate, key) not in loaded:
            loaded[certificate, key] = _load(problems, f"{where}.tls_certificate",
                                             loaders.server_options, certificate, key)
        return loaded[certificate, key]

    if smtp.certificate_created:
        # Made and loaded only where a listener serves it.
        if smtp.tls_certificate in (li.tls_certificate for li in smtp.listeners if li.tls != "off"):
            _create_certificate(config, problems, loaders.create_files)
    elif smtp.tls_certificate and smtp.tls_key:
        pair(smtp.tls_certificate, smtp.tls_key, "smtp")
    options = {}
    for listener in smtp.listeners:
        if not (listener.tls_certificate and listener.tls_key) or listener.tls == "off":
            continue
        own = (listener.tls_certificate, listener.tls_key) != (smtp.tls_certificate, smtp.tls_key)
        if not own and smtp.certificate_created and not os.path.exists(smtp.tls_certificate):
            continue  # the pair a first start makes; not made by a check
        tls = pair(listener.tls_certificate, listener.tls_key,
                   f"smtp.listeners.{listener.name}" if own else "smtp")
        if tls is not None:
            options[listener.name] = tls
    return options


def _signer(config: Config, problems: Problems, loaders: Loaders) -> Signer | None:
    """The DKIM signer of the configured keys, or ``None`` when no key is configured."""
    keys = []
    for c in config.dkim:
        key = _load(problems, f"{c.where or 'dkim'}.key_file", loaders.private_key, c.key_file)
        if key is None:
            continue
        weak = weakness(key)
        if weak:
            log.warn("DKIM key {path}: {weak}", path=c.key_file, weak=weak)
        keys.append(SigningKey(c.domain, c.selector, key, c.headers))
    # With problems the build fails anyway, and a key's table may be among them.
    return Signer(keys) if keys and not problems else None

