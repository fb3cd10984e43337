"""
Helper processes, measured: ``[appliance] helpers`` on against off, and what crossing costs.

``relay`` (the default): two appliances built from this tree, one with
``helpers = "auto"`` (or ``--helpers N``) and one with ``helpers = 0``, and a
private Postfix, relaying the same message to the same ``smtp-sink`` with
the same ``smtp-source`` load, alternating all three ``--rounds`` times (the
machinery of ``bench/relay_bench.py``, whose needs apply: root, Postfix's
``postfix``, ``smtp-source`` and ``smtp-sink``). It prints msgs/s, the CPU of
each process tree per 1,000 messages, and the owner's own CPU per message
split into its main (reactor) thread, its other threads and its helpers.

``crossing``: no processes but one helper. What a copy costs made in this
process, against what the owner spends to have a helper make it (pickling
the job, reading the answer), and the copies per second one helper returns.

    sudo .venv/bin/python bench/helpers_bench.py relay
    .venv/bin/python bench/helpers_bench.py crossing
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

from relay_bench import (  # noqa: E402
    FIXTURE,
    REPO,
    SETTLE,
    appliance_config,
    terminated_on_signals,
    twistd_command,
)
from relay_processes import (  # noqa: E402
    CLOCK_TICKS,
    Postfix,
    Sink,
    Unavailable,
    children,
    run_source,
    source_command,
    start,
    stop,
    tree_cpu_seconds,
)

from tests.ports import free_port  # noqa: E402


def thread_ticks(pid: int) -> dict[int, int]:
    """utime+stime of each thread of ``pid``, in ticks."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        out[int(tid)] = int(fields[11]) + int(fields[12])
    return out


@dataclass
class Split:
    """CPU seconds of the owner: its main thread, its other threads, its child processes."""

    main: float
    threads: float
    helpers: float

    @classmethod
    def of(cls, pid: int) -> Split:
        ticks = thread_ticks(pid)
        main = ticks.pop(pid, 0)
        helpers = sum(tree_cpu_seconds(child) for child in children(pid))
        return cls(main / CLOCK_TICKS, sum(ticks.values()) / CLOCK_TICKS, helpers)

    def __sub__(self, other: Split) -> Split:
        return Split(self.main - other.main, self.threads - other.threads, self.helpers - other.helpers)


@dataclass
class Run:
    seconds: float
    cpu: float
    split: Split | None


def one_run(sink: Sink, command: list[str], copies: int, pid: int, owner: bool,
            timeout: float) -> Run:
    target = sink.count + copies
    cpu0 = tree_cpu_seconds(pid)
    split0 = Split.of(pid) if owner else None
    t0 = time.perf_counter()
    run_source(command, timeout)
    if not sink.wait_for(target, timeout):
        raise RuntimeError(f"only {copies - (target - sink.count)} of {copies} copies arrived")
    seconds = time.perf_counter() - t0
    time.sleep(SETTLE)
    split = Split.of(pid) - split0 if split0 is not None else None
    # Helpers that ended between the readings are in the owner's cutime: tree_cpu counts them.
    return Run(seconds, tree_cpu_seconds(pid) - cpu0, split)


def relay(args: argparse.Namespace) -> None:
    Postfix.check_possible()
    with terminated_on_signals(), contextlib.ExitStack() as stack:
        top = stack.enter_context(tempfile.TemporaryDirectory(prefix="helpers-bench-", dir=args.directory))
        os.chmod(top, 0o755)  # Postfix's daemons run as postfix
        message = os.path.join(top, "message.eml")
        with open(FIXTURE, "rb") as src, open(message, "wb") as dst:
            dst.write(src.read())
        sink = Sink(free_port(), os.path.join(top, "sink"))
        stack.callback(sink.stop)
        sides: dict[str, tuple[int, int]] = {}  # name -> (pid, port)
        for name, helpers in ((f"helpers={args.helpers}", args.helpers), ("helpers=0", "0")):
            directory = os.path.join(top, name.replace("=", "-"))
            os.mkdir(directory)
            port = free_port()
            config = appliance_config(directory, port, free_port(), sink.port, args.sessions, None)
            value = helpers if helpers.isdigit() else f'"{helpers}"'
            with open(config, "a") as f:
                f.write(f"\n[appliance]\nhelpers = {value}\n")
            app = start(twistd_command(directory, config), port, directory, REPO)
            stack.callback(stop, app)
            sides[name] = (app.pid, port)
        postfix = Postfix(os.path.join(top, "postfix"), free_port(), sink.port)
        stack.callback(postfix.stop)
        postfix.start()
        sides["postfix"] = (postfix.master_pid(), postfix.port)
        print(f"helpers bench: {args.messages} messages per run, {args.rounds} alternations, "
              f"{args.sessions} sessions; {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f} at start")
        for name, (pid, _) in sides.items():
            if name != "postfix":
                print(f"  {name}: pid {pid}, {len(children(pid))} helper process(es)")
        runs: dict[str, list[Run]] = {name: [] for name in sides}
        for name, (pid, port) in sides.items():  # warm-up
            one_run(sink, source_command(port, message, 100, args.sessions, 1), 100, pid,
                    name != "postfix", args.timeout)
        for round_ in range(1, args.rounds + 1):
            for name, (pid, port) in sides.items():
                runs[name].append(one_run(sink, source_command(port, message, args.messages,
                                                               args.sessions, 1),
                                          args.messages, pid, name != "postfix", args.timeout))
                sink.clear()
            print(f"round {round_}: " + ", ".join(
                f"{name} {args.messages / rs[-1].seconds:.0f} msgs/s" for name, rs in runs.items()))
        report(runs, args.messages)


def report(runs: dict[str, list[Run]], n: int) -> None:
    def rate(name: str) -> float:
        return statistics.median(n / r.seconds for r in runs[name])

    print(f"\ninject -> track -> deliver (medians of {len(runs['postfix'])}):")
    for name, rs in runs.items():
        cpu = statistics.median(r.cpu for r in rs) / n * 1000
        line = f"  {name:<14} {rate(name):7.1f} msgs/s   CPU {cpu:5.2f} s per 1,000 msgs"
        if rs[0].split is not None:
            def ms(part: str, rs: list[Run] = rs) -> float:
                return statistics.median(getattr(r.split, part) for r in rs) / n * 1000
            line += (f"   per msg: main thread {ms('main'):.2f} ms, other threads {ms('threads'):.2f} ms, "
                     f"helpers {ms('helpers'):.2f} ms")
        print(line + "   (runs: " + ", ".join(f"{n / r.seconds:.0f}" for r in rs) + ")")
    names = list(runs)
    on, off = names[0], names[1]
    print(f"  {on} / helpers=0: {rate(on) / rate(off):.2f} x the msgs/s")
    print(f"  {on} / postfix: {rate(on) / rate('postfix'):.2f} x;  helpers=0 / postfix: "
          f"{rate(off) / rate('postfix'):.2f} x")


# -- the crossing ----------------------------------------------------------------------

def timed(f: Callable[[], object], rounds: int) -> float:
    """Median seconds of ``f`` over ``rounds`` batches of 20 calls, per call."""
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(20):
            f()
        times.append((time.perf_counter() - t0) / 20)
    return statistics.median(times)


def kit_render(kit: object, prepared: object, identity: object, tracking: object) -> bytes:
    from appliance.copywork import render_copy, with_list_unsubscribe

    copy = render_copy(prepared, kit.codec, identity, tracking, None)  # type: ignore[arg-type, attr-defined]
    return with_list_unsubscribe(copy, kit.codec, identity, tracking)  # type: ignore[arg-type, attr-defined]


def crossing(args: argparse.Namespace) -> None:
    from twisted.internet import defer, reactor

    from appliance.copywork import Kit, PreparedFacts, prepare_message
    from appliance.helpers import HelperPool
    from appliance.helpers.frames import FrameReader, frame
    from appliance.links import Keyring, LinkCodec
    from appliance.rewrite import Identity
    from appliance.settings import Tracking

    with open(FIXTURE, "rb") as f:
        message = f.read().replace(b"\n", b"\r\n")
    codec = LinkCodec(Keyring(((1, b"k" * 32),)))
    tracking = Tracking(open_tracking=True, click_tracking=True, campaign_id="bench")
    identity = Identity("00112233445566778899", "12345", "reader@example.test")
    kit = Kit.local(codec, None, None)
    prepared = prepare_message("t", message)
    kit.cache = None
    copy = kit.copy("t", message, 100, identity, tracking)
    rounds = args.rounds * 10
    t_prepare = timed(lambda: prepare_message("t", message), rounds)
    t_copy = timed(lambda: kit.sign(kit_render(kit, prepared, identity, tracking)), rounds)
    facts = PreparedFacts.of(prepared, codec, None, None, [(identity, tracking)])
    answer = frame((1, True, copy))
    t_cached = timed(lambda: (frame(("job", 1, "copy", ("t", None, 100, identity, tracking))),
                              FrameReader().feed(answer)), rounds)
    t_first = timed(lambda: (frame(("job", 1, "copy", ("t", message, 100, identity, tracking))),
                             FrameReader().feed(answer)), rounds)
    t_prep_x = timed(lambda: (frame(("job", 1, "prepare", ("t", message, 100, [(identity, tracking)]))),
                              FrameReader().feed(frame((1, True, facts)))), rounds)
    t_back = timed(lambda: FrameReader().feed(frame((1, True, prepared))), rounds)
    print(f"message: {os.path.relpath(FIXTURE)}, {len(message)} bytes; copy {len(copy)} bytes; "
          f"prepared form {len(frame(prepared))} bytes pickled, its facts {len(frame(facts))}")
    print(f"  in this process: prepare {t_prepare * 1e3:.3f} ms, one copy (render, sign off) "
          f"{t_copy * 1e3:.3f} ms")
    print(f"  the owner's side of crossing: a copy job, message held by the helper "
          f"{t_cached * 1e3:.3f} ms ({t_cached / t_copy:.2f} x making it here), with the message "
          f"{t_first * 1e3:.3f} ms; a prepare job {t_prep_x * 1e3:.3f} ms ({t_prep_x / t_prepare:.2f} x "
          f"preparing here); a prepared form back, were it sent: {t_back * 1e3:.3f} ms")

    pool = HelperPool(1, reactor, None, codec)  # type: ignore[arg-type]

    @defer.inlineCallbacks
    def go() -> object:
        pool.startService()
        yield pool.sign(b"warm")
        results = []
        for _ in range(args.rounds):
            count = 400
            t0 = time.perf_counter()
            yield defer.gatherResults([pool.copy("t", 100, identity, tracking, lambda: defer.succeed(message))
                                       for _ in range(count)])
            results.append(count / (time.perf_counter() - t0))
        print(f"  one helper, {count} copies at a time: {statistics.median(results):.0f} copies/s; "
              f"this process alone: {1 / t_copy:.0f} copies/s")
        yield pool.stopService()
        reactor.stop()

    reactor.callWhenRunning(go)
    reactor.run()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().split("\n\n")[0])
    parser.add_argument("what", nargs="?", choices=("relay", "crossing"), default="relay")
    parser.add_argument("--helpers", default="auto", help='the measured side\'s helpers (default "auto")')
    parser.add_argument("--messages", type=int, default=1000, help="messages per run (default 1000)")
    parser.add_argument("--rounds", type=int, default=3, help="alternations (default 3)")
    parser.add_argument("--sessions", type=int, default=10, help="parallel SMTP sessions (default 10)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds a run may take")
    parser.add_argument("--directory", help="where the temporary directory goes (default: $TMPDIR)")
    args = parser.parse_args(argv)
    if args.helpers == "0":
        parser.error("--helpers 0 is the side it is measured against: give N > 0 or \"auto\"")
    try:
        if args.what == "crossing":
            crossing(args)
        else:
            relay(args)
    except Unavailable as e:
        print(f"helpers_bench: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("helpers_bench: interrupted; everything stopped and removed", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
