"""
Injection throughput: the appliance against a bare Twisted SMTP server.

Both servers run as separate processes on loopback and are driven by the same
asyncio client from this process (C connections, each sending messages back
to back). The appliance stores every message durably (fsync before 250),
writes events and delivers each copy to a discarding server, so the ratio is
what the appliance's guarantees cost against Twisted's SMTP dialogue alone.
Rounds alternate between the two servers; medians are printed.

    .venv/bin/python bench/smtp_bench.py [--messages 400] [--concurrency 8] [--rounds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from tests.ports import free_port, wait_for_port  # noqa: E402

BODY = (b"From: bench@example.net\r\nTo: r@example.test\r\nSubject: bench\r\n\r\n"
        + b"".join(b"Line %d of a plain message body that looks like mail.\r\n" % i for i in range(60)))


async def reply(reader: asyncio.StreamReader) -> bytes:
    while True:
        line = await reader.readline()
        if not line:
            raise ConnectionError("server closed the connection")
        if line[3:4] != b"-":
            if line[:1] not in b"23":
                raise RuntimeError(f"unexpected reply {line!r}")
            return line


async def client(port: int, count: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    await reply(reader)
    writer.write(b"EHLO bench\r\n")
    await reply(reader)
    for _ in range(count):
        for command in (b"MAIL FROM:<bench@example.net>\r\n", b"RCPT TO:<r@example.test>\r\n",
                        b"DATA\r\n"):
            writer.write(command)
            await reply(reader)
        writer.write(BODY + b".\r\n")
        await reply(reader)
    writer.write(b"QUIT\r\n")
    await reply(reader)
    writer.close()


async def drive(port: int, messages: int, concurrency: int) -> float:
    start = time.perf_counter()
    await asyncio.gather(*(client(port, messages // concurrency) for _ in range(concurrency)))
    return (messages // concurrency * concurrency) / (time.perf_counter() - start)


def appliance_config(directory: str, smtp_port: int, sink_port: int) -> str:
    path = os.path.join(directory, "appliance.toml")
    with open(os.path.join(REPO, "etc", "appliance.toml")) as f:
        text = f.read()
    text = text.replace('"tcp:2525:interface=127.0.0.1"', f'"tcp:{smtp_port}:interface=127.0.0.1"')
    text = text.replace('"tcp:8080:interface=127.0.0.1"', f'"tcp:{free_port()}:interface=127.0.0.1"')
    text = text.replace('"127.0.0.1:2526"', f'"127.0.0.1:{sink_port}"')
    text = text.replace('"var/', f'"{directory}/var/')
    with open(path, "w") as f:
        f.write(text)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=400)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    env = {**os.environ, "PYTHONPATH": REPO}
    with tempfile.TemporaryDirectory() as tmp:
        bare_port, sink_port, app_port = free_port(), free_port(), free_port()
        procs = [
            subprocess.Popen([sys.executable, os.path.join(REPO, "bench", "bare_smtp.py"), str(p)],
                             env=env)
            for p in (bare_port, sink_port)
        ]
        procs.append(subprocess.Popen(
            [os.path.join(os.path.dirname(sys.executable), "twistd"), "-l",
             os.path.join(tmp, "twistd.log"), "-n", "--pidfile=", "engage-appliance", "-c",
             appliance_config(tmp, app_port, sink_port)], env=env, cwd=tmp))
        try:
            for proc, port in zip(procs, (bare_port, sink_port, app_port), strict=True):
                wait_for_port(port, proc)
            asyncio.run(drive(app_port, 40, 4))  # warm-up
            results: dict[str, list[float]] = {"bare twisted": [], "appliance": []}
            for _ in range(args.rounds):
                results["bare twisted"].append(asyncio.run(drive(bare_port, args.messages,
                                                                 args.concurrency)))
                results["appliance"].append(asyncio.run(drive(app_port, args.messages,
                                                              args.concurrency)))
        finally:
            for proc in procs:
                proc.terminate()
                proc.wait()
    base = statistics.median(results["bare twisted"])
    print(f"{args.messages} messages of {len(BODY)} bytes, {args.concurrency} connections, "
          f"{args.rounds} rounds (medians)")
    for name, values in results.items():
        median = statistics.median(values)
        print(f"  {name:<13} {median:8.1f} msg/s   ratio {median / base:5.2f}   "
              f"(rounds: {', '.join(f'{v:.0f}' for v in values)})")


if __name__ == "__main__":
    main()
