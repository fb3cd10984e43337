"""
The suppression list: recipients who get no copy, by SparkPost's two scopes.

- ``store``: the SQLite database, the entries the event log's events make,
  SparkPost's CSV; blocking, for the file pool and the operator's command;
- ``service``: the in-memory scopes injection asks, kept current by the
  event log's follower, the admin API and a check for other processes' writes.
"""

from appliance.suppression.service import SuppressionList, SuppressionService
from appliance.suppression.store import (
    NON_TRANSACTIONAL,
    SOURCES,
    SUPPRESSING_TYPES,
    TRANSACTIONAL,
    TYPES,
    Change,
    Entry,
    SuppressionError,
    SuppressionStore,
    changes_for,
    changes_in,
    check_database,
    normalize,
    read_csv,
)

__all__ = [
    "NON_TRANSACTIONAL",
    "SOURCES",
    "SUPPRESSING_TYPES",
    "TRANSACTIONAL",
    "TYPES",
    "Change",
    "Entry",
    "SuppressionError",
    "SuppressionList",
    "SuppressionService",
    "SuppressionStore",
    "changes_for",
    "changes_in",
    "check_database",
    "normalize",
    "read_csv",
]
