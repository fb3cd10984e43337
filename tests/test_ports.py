"""The test ports: parallel workers must never be handed the same one."""

from __future__ import annotations

import os
import subprocess
import sys

from twisted.trial.unittest import SynchronousTestCase

from tests.ports import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Each picker stays alive until told to go: a port is held only while its process lives.
PICK = ("import sys; from tests.ports import free_port; "
        "print(' '.join(str(free_port()) for _ in range(300)), flush=True); sys.stdin.read()")


class FreePortTests(SynchronousTestCase):
    def test_processes_picking_at_once_get_different_ports(self) -> None:
        env = {**os.environ, "PYTHONPATH": ROOT}
        pickers = [subprocess.Popen([sys.executable, "-c", PICK], stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, env=env, text=True) for _ in range(3)]
        mine = {free_port() for _ in range(100)}
        sets = [set(map(int, p.stdout.readline().split())) for p in pickers]  # type: ignore[union-attr]
        for p in pickers:
            p.communicate(timeout=60)
        self.assertEqual([len(s) for s in sets], [300, 300, 300])
        everything = set().union(mine, *sets)
        self.assertEqual(len(everything), 1000)
