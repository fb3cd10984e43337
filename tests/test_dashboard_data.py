import os

from twisted.internet import defer
from twisted.trial.unittest import SynchronousTestCase

from appliance.admin import dashboard_data
from appliance.admin.dashboard_data import last_lines, on_reactor, runner


class LastLinesTests(SynchronousTestCase):
    def write(self, data: bytes) -> str:
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(data)
        return path

    def test_the_last_lines_whole(self) -> None:
        lines = [b'{"n": %d, "pad": "%s"}\n' % (i, b"x" * (i % 97)) for i in range(5000)]
        path = self.write(b"".join(lines))
        self.patch(dashboard_data, "_TAIL_CHUNK", 1000)  # many reads, lines cut at chunk edges
        self.assertEqual(last_lines(path, 30), lines[-30:])
        self.assertEqual(last_lines(path, 1), lines[-1:])
        self.assertEqual(last_lines(path, 0), [])

    def test_a_line_being_written_is_left(self) -> None:
        path = self.write(b"one\ntwo\nthr")
        self.assertEqual(last_lines(path, 5), [b"one\n", b"two\n"])

    def test_fewer_lines_than_asked_and_no_file(self) -> None:
        self.assertEqual(last_lines(self.write(b"a\nb\n"), 10), [b"a\n", b"b\n"])
        self.assertEqual(last_lines(self.write(b""), 10), [])
        self.assertEqual(last_lines(os.path.join(self.mktemp(), "none"), 10), [])


class RunnerTests(SynchronousTestCase):
    def test_reactor_methods_run_in_place_the_rest_through_the_pool(self) -> None:
        pooled = []

        def pool(f, *args):
            pooled.append(f)
            return defer.succeed(f(*args))

        @on_reactor
        def live() -> int:
            return 1

        def blocking() -> int:
            return 2

        run = runner(pool)
        self.assertEqual(self.successResultOf(run(live)), 1)
        self.assertEqual(self.successResultOf(run(blocking)), 2)
        self.assertEqual(pooled, [blocking])


class QueueByDomainTests(SynchronousTestCase):
    def test_groups_oldest_held_next_and_error(self) -> None:
        from datetime import UTC, datetime
        from types import SimpleNamespace as C

        copies = [C(domain="b.test", received_at=100, next_attempt=900, last_error="421 busy", held=False),
                  C(domain="b.test", received_at=50, next_attempt=None, last_error="451 later", held=True),
                  C(domain="b.test", received_at=70, next_attempt=800, last_error="", held=False),
                  C(domain="a.test", received_at=10, next_attempt=None, last_error="", held=False)]
        [b, a] = dashboard_data.queue_by_domain(copies)
        self.assertEqual((b.domain, b.copies, b.held), ("b.test", 3, 1))
        self.assertEqual(b.oldest, datetime.fromtimestamp(50, UTC))
        self.assertEqual(b.next_attempt, datetime.fromtimestamp(800, UTC))
        self.assertEqual(b.last_error, "451 later")
        self.assertEqual((a.domain, a.copies, a.next_attempt, a.last_error), ("a.test", 1, None, ""))
        self.assertEqual(dashboard_data.queue_by_domain([]), [])
