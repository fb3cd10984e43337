"""
The admin listener: health, metrics, the queue, statistics and events for operators.

Every resource here answers JSON (or Prometheus text, or a page) over plain
objects handed to it; ``appliance.service`` builds the listener and mounts them.
"""
