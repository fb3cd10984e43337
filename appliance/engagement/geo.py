"""
SparkPost's ``geo_ip`` object from a MaxMind database (GeoIP2/GeoLite2 City or Country).

SparkPost's samples give ``country`` (ISO 3166-1 code), ``region`` (the
subdivision's ISO code), ``city``, ``latitude`` and ``longitude`` (numbers),
``zip`` (a number) and ``postal_code`` (a string); a field the database does
not know for an address is left out, and so is ``zip`` when the postal code
is not a number. The database is opened once (memory-mapped by ``maxminddb``)
and each lookup is cached, as the same proxies and clients come back.
"""

from __future__ import annotations

import functools
from typing import Any

import maxminddb

# Distinct addresses kept looked up.
CACHE_SIZE = 4096


class GeoDatabaseError(ValueError):
    """The database is missing, unreadable or not a MaxMind database."""


class GeoIP:
    """Looks addresses up in one MaxMind database."""

    def __init__(self, reader: Any, path: str = "") -> None:
        self._reader = reader
        self.path = path
        self.lookup = functools.lru_cache(maxsize=CACHE_SIZE)(self._lookup)

    def _lookup(self, address: str) -> dict[str, Any] | None:
        """The ``geo_ip`` of ``address``, or ``None`` when the database does not know it."""
        try:
            record = self._reader.get(address)
        except ValueError:  # not an address
            return None
        if not isinstance(record, dict):
            return None
        return geo_ip(record) or None

    def close(self) -> None:
        self._reader.close()


def geo_ip(record: dict[str, Any]) -> dict[str, Any]:
    """SparkPost's ``geo_ip`` fields from one MaxMind record."""
    out: dict[str, Any] = {}
    country = _get(record, "country", "iso_code")
    if isinstance(country, str):
        out["country"] = country
    subdivisions = record.get("subdivisions")
    if isinstance(subdivisions, list) and subdivisions and isinstance(subdivisions[0], dict):
        region = subdivisions[0].get("iso_code")
        if isinstance(region, str):
            out["region"] = region
    city = _get(record, "city", "names", "en")
    if isinstance(city, str):
        out["city"] = city
    for name in ("latitude", "longitude"):
        value = _get(record, "location", name)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[name] = float(value)
    postal = _get(record, "postal", "code")
    if isinstance(postal, str) and postal:
        if postal.isascii() and postal.isdigit():
            out["zip"] = int(postal)
        out["postal_code"] = postal
    return out


def _get(record: dict[str, Any], *path: str) -> Any:
    value: Any = record
    for key in path:
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value


def open_geoip(path: str) -> GeoIP:
    """Open the database at ``path``; raises ``GeoDatabaseError`` with the reason."""
    try:
        reader = maxminddb.open_database(path)
    except FileNotFoundError:
        raise GeoDatabaseError(f"{path}: no such file") from None
    except (OSError, ValueError, RuntimeError) as e:  # InvalidDatabaseError is a RuntimeError
        raise GeoDatabaseError(f"{path}: not a readable MaxMind database: {e}") from None
    return GeoIP(reader, path)
