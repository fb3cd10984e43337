"""``[stats]``: where the statistics store keeps its counts."""

from __future__ import annotations

from dataclasses import dataclass

from appliance.config.tables import Table


@dataclass(frozen=True)
class StatsConfig:
    # The SQLite file of counts per campaign, hour and link; rebuilt from the event log if lost.
    database: str = "var/stats.sqlite3"
    # Off: no follower counts the log (the metrics API and "stats" then answer from what was kept).
    enabled: bool = True


def read_stats(t: Table) -> StatsConfig:
    c = StatsConfig(database=t.path_("database", StatsConfig.database),
                    enabled=t.bool("enabled", StatsConfig.enabled))
    t.finish()
    return c
