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
