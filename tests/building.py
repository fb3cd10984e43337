"""Configuration tests through the builder: shape, values and the files named, checked at once."""

from __future__ import annotations

from typing import Any

from appliance.build import Loaders, Parts, build_from_toml
from appliance.config import Config
from appliance.links import Keyring, new_keyring


def _keyring(path: str, create: bool) -> Keyring:
    return new_keyring()  # the link key file is not what these tests are about: none is written


def _admin_token(path: str, create: bool) -> str:
    return "token"  # nor is the admin token file


def _suppression(path: str) -> None:
    pass  # nor the suppression database: none is created


LOADERS = Loaders(keyring=_keyring, admin_token=_admin_token, suppression=_suppression)


def configure(data: dict[str, Any], source: str = "x.toml") -> Parts:
    """Check ``data`` and load every file it names; raises one ``ConfigError`` with every problem."""
    return build_from_toml(data, source, LOADERS)


def checked(data: dict[str, Any], source: str = "x.toml") -> Config:
    """The configuration of ``data``, once it and the files it names have passed."""
    return configure(data, source).config
