"""
Helper processes: the copies' CPU work (prepare, render, sign) on the machine's other cores.

``pool`` is the owner's side (a Twisted service), ``child`` the process's
main, ``frames`` what crosses the pipes between them.
"""

from appliance.helpers.pool import HelperCrashed, HelperJobFailed, HelperPool

__all__ = ["HelperCrashed", "HelperJobFailed", "HelperPool"]
