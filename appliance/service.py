"""
Where the parts meet: builds the appliance's service tree from the ``Parts``
that ``appliance.build`` made of a ``Config``, on the reactor it is given.

Start order matters and is the order of ``addService`` below: the file
thread pool comes first (and so stops last), the webhooks
recover their queues first (they hear of every event written), the event log
opens next (everything writes to it), then the spool is prepared and the
delivery queue picks up what a previous run left, and only then do the
listeners accept connections. Stopping goes the other way, one part at a
time: ``MultiService`` would stop every child at once, and the event log
would close while deliveries in flight still had outcomes to write. Right
after the listeners, the ``SessionDrain`` waits for messages already
received, so their ``injection`` events are written and their ``250`` sent
before delivery and the event log stop.
"""

from __future__ import annotations

import functools
import os
from typing import Any

from prometheus_client import CollectorRegistry
from twisted.application import strports
from twisted.application.service import MultiService, Service
from twisted.internet import defer
from twisted.logger import Logger
from twisted.web.resource import IResource

from appliance.admin.dashboard import Dashboard, DestinationQueue
from appliance.admin.dashboard_data import StoreData, queue_by_domain
from appliance.admin.dashboard_data import runner as dashboard_runner
from appliance.admin.deliverability import DeliverabilityResource
from appliance.admin.events import EventSearchResource
from appliance.admin.health import Health
from appliance.admin.metrics import EventCounters, Readings, tracker_latency
from appliance.admin.queue import QueueResource
from appliance.admin.site import AdminSite, make_admin_site
from appliance.admin.suppressions import SuppressionList
from appliance.build import Parts
from appliance.delivery import DeliveryService, Router
from appliance.delivery.copies import CopyMaker
from appliance.engagement import Engagement
from appliance.engagement.networks import NetworksFileError, read_networks
from appliance.events import EventLog
from appliance.helpers import HelperPool
from appliance.injection import Injector
from appliance.links import LinkCodec
from appliance.policy import Policy
from appliance.reactors import Reactor, Runner
from appliance.sighup import SighupService
from appliance.smtp import AuthGuard, ConnectionLimits, SessionDrain, listener_factory
from appliance.spares import SPARE_FILES
from appliance.spool import Spool
from appliance.spoollock import SpoolLock, SpoolLocked
from appliance.stats import StatsService
from appliance.suppression import SUPPRESSING_TYPES, SuppressionService
from appliance.tracker import make_site
from appliance.tracker.processes import TrackerProcesses, engagement_files, share
from appliance.users import UsersFileChecker
from appliance.webhooks import Webhooks
from appliance.workers import WorkerPool

log = Logger()


class SpoolService(Service):
    """Prepares the spool directory before anything reads or writes it."""

    name = "spool"

    def __init__(self, spool: Spool) -> None:
        self.spool = spool

    def startService(self) -> None:
        self.spool.prepare()
        super().startService()

    def stopService(self) -> Any:
        super().stopService()
        return self.spool.spares.close()


class PoolService(Service):
    """A ``WorkerPool`` as a service: its threads start with it, and a stop lets queued work finish."""

    threads = 1
    thread_name = "appliance"

    def __init__(self, reactor: Reactor) -> None:
        self.pool = WorkerPool(reactor, self.threads, self.thread_name)

    def startService(self) -> None:
        self.pool.start()
        super().startService()

    def stopService(self) -> None:
        super().stopService()
        self.pool.stop()


class FilePool(PoolService):
    """
    The threads that do the appliance's file work: spool commits, journal and queue fsyncs.

    Its own pool, so an fsync a reply waits on never queues behind CPU work in
    the CPU pool. Started first and stopped last, after everything that
    writes files has stopped.
    """

    name = "file-pool"
    threads = 4
    thread_name = "appliance-files"


class CpuPool(PoolService):
    """
    The threads that do the appliance's CPU work: preparing messages, large renders, DKIM.

    Python runs one thread at a time, so more threads would only take turns;
    a few let OpenSSL's signing, which lets go of the interpreter, overlap.
    """

    name = "cpu-pool"
    threads = 4
    thread_name = "appliance-cpu"


class PasswordPool(PoolService):
    """
    The one thread that checks AUTH passwords (scrypt).

    In the CPU pool, checks clients ask for at will queued ahead of the
    CPU work replies wait on; and scrypt releases the GIL, so a larger pool
    under attack would take every core. ``smtp.auth_attempts_per_second``
    bounds what queues here.
    """

    name = "password-pool"
    threads = 1
    thread_name = "appliance-passwords"


class Appliance(MultiService):
    """
    The whole appliance; its parts are attributes so tests and tools can reach them.

    It holds its spool's lock (``appliance.spoollock``) from before the first port
    opens until every part has stopped: twistd calls ``privilegedStartService`` in
    the process that runs, after it has daemonized, and a second appliance on the
    same spool fails there, having opened and moved nothing.
    """

    def privilegedStartService(self) -> None:
        self._lock_spool()
        try:
            if self.sighup is not None:
                self.sighup.install()  # before the ports: see SighupService.install
            super().privilegedStartService()
        except BaseException:
            if self.sighup is not None:
                self.sighup.stopService()  # gives the handler it replaced back
            self.spool_lock.release()
            raise

    def startService(self) -> None:
        self._lock_spool()  # already held when twistd made the privileged start
        super().startService()

    def _lock_spool(self) -> None:
        try:
            self.spool_lock.acquire()
        except SpoolLocked as e:
            log.critical("not starting: {why}", why=e)
            raise

    @defer.inlineCallbacks
    def stopService(self) -> Any:
        """Stop the children in reverse start order, each after the one before has finished."""
        Service.stopService(self)
        for child in reversed(list(self)):
            try:
                yield defer.maybeDeferred(child.stopService)
            except Exception:
                log.failure("stopping {name} failed", name=child.name)
        self.spool_lock.release()

    def __init__(self, parts: Parts, reactor: Reactor, run: Runner | None = None,
                 resolver: Any = None, handle_sighup: bool = True) -> None:
        """
        ``parts`` come from ``appliance.build``; ``reactor`` makes every timer, connection and
        listener. ``run`` runs blocking work, file and CPU alike (unless given: file work in
        a ``FilePool``, CPU work in a ``CpuPool``).
        ``handle_sighup``: SIGHUP reopens the event log and re-reads the link key file; off
        where the process is not ours to signal (tests).
        """
        super().__init__()
        config = parts.config
        self.config = config
        self.reactor = reactor
        run, run_files, run_passwords = self._pools(reactor, run)
        self._run_cpu, self._run_files = run, run_files
        self._mail_path(parts, reactor, run, run_files, resolver)
        self._helpers(parts, reactor, run)
        self._webhooks(parts, reactor, run_files)
        # The order children are added is the start order (and stop goes the other way).
        self.webhooks.setServiceParent(self)
        self.events.setServiceParent(self)
        self._stats(parts, reactor, run_files)
        SpoolService(self.spool).setServiceParent(self)
        self.delivery.setServiceParent(self)
        self._suppression(reactor, run_files)
        self._smtp(parts, reactor, run_passwords)
        self._engagement(parts, run_files)
        self._tracker(reactor)
        self._admin(parts, reactor)
        self._sighup(reactor, handle_sighup)

    def _pools(self, reactor: Reactor, run: Runner | None) -> tuple[Runner, Runner, Runner]:
        """Where blocking work runs: CPU, file system and password checks, each apart."""
        self.file_pool: FilePool | None = None
        self.cpu_pool: CpuPool | None = None
        self.password_pool: PasswordPool | None = None
        if run is not None:
            return run, run, run
        self.file_pool = FilePool(reactor)
        self.file_pool.setServiceParent(self)  # first: it is stopped after everything else
        self.cpu_pool = CpuPool(reactor)
        self.cpu_pool.setServiceParent(self)
        self.password_pool = PasswordPool(reactor)
        self.password_pool.setServiceParent(self)
        return self.cpu_pool.pool.run, self.file_pool.pool.run, self.password_pool.pool.run

    def _mail_path(self, parts: Parts, reactor: Reactor, run: Runner, run_files: Runner,
                   resolver: Any) -> None:
        """The event log, the spool, the copies, delivery and injection."""
        config = parts.config
        self.links = LinkCodec(parts.keyring)
        self.events = EventLog(config.events.log_file, config.node.name,
                               customer_id=config.events.customer_id,
                               fsync_interval=config.events.fsync_interval, clock=reactor,
                               run=run_files,
                               file_mode=config.events.file_mode,
                               # tracker processes: each has its own bits in event_id, this one 0
                               process=0 if config.tracker.processes > 1 else None)
        # Given the reactor, the spool writes "events written" marks a second late, in
        # batches, and skips those of messages delivered by then.
        self.spool = Spool(config.spool.directory, run=run_files, clock=reactor, spares=SPARE_FILES)
        self.spool_lock = SpoolLock(config.spool.directory)
        self.router = Router(config.delivery)
        # Each recipient's copy is made from the spooled text when delivery needs it;
        # the prepared form of a message is cached, so N copies cost one parse.
        self.copies = CopyMaker(self.spool.read_message, self.links, signer=parts.signer, run=run,
                                max_links=config.smtpapi.max_tracked_links,
                                max_size=config.smtp.max_message_size,
                                trap_links=config.engagement_tracker.bot_trap_link)
        self.delivery = DeliveryService(
            config.delivery, self.spool, self.events, self.copies,
            self.router, helo_name=config.delivery.helo_name or config.node.hostname,
            reactor=reactor, resolver=resolver, on_message_done=self.copies.forget,
            trust=parts.delivery_trust,
        )
        self.policy = Policy(parts.policy_hook, config.policy.timeout, reactor,
                             config.engagement_tracker.max_metadata_len)
        self.injector = Injector(self.spool, self.events, self.router, self.delivery,
                                 hostname=config.node.hostname, policy=self.policy,
                                 copies=self.copies, tracker=config.engagement_tracker,
                                 max_hops=config.smtp.max_hops,
                                 # Looked up when called: a reactor for tests may have none.
                                 next_turn=lambda f: reactor.callFromThread(f))
        # Recovery writes the events a message still owed when the process ended.
        self.spool.on_owed = self.injector.recover_owed

    def _helpers(self, parts: Parts, reactor: Reactor, run: Runner) -> None:
        """
        Helper processes for the copies' CPU work (``[appliance] helpers``), before delivery
        starts and stopped after it; none where the caller says where work runs (tests).
        """
        self.helpers: HelperPool | None = None
        count = parts.config.appliance.helper_count()
        if count == 0 or self.file_pool is None:
            return
        self.helpers = HelperPool(count, reactor, run, self.links, signer=parts.signer,  # type: ignore[arg-type]
                                  max_size=parts.config.smtp.max_message_size)
        self.helpers.setServiceParent(self)
        self.copies.helpers = self.helpers

    def _webhooks(self, parts: Parts, reactor: Reactor, run_files: Runner) -> None:
        """
        Each webhook reads the event log from its own cursor and queues the events it
        wants under the spool; batches are posted from there, so the event log never
        waits for a receiver. A write to the log wakes the followers.
        """
        config = parts.config
        self.webhooks = Webhooks(config.webhooks, os.path.join(config.spool.directory, "webhooks"),
                                 config.events.log_file, clock=reactor, run=run_files,
                                 trust=parts.webhook_trust,
                                 fsync_interval=config.events.fsync_interval)
        self.events.wake_on_write(self.webhooks.wake)

    def _suppression(self, reactor: Reactor, run_files: Runner) -> None:
        """
        The suppression list: loaded before the listeners start, so injection asks it from
        the first message on; fed by its own follower of the event log, woken on each write.
        """
        config = self.config
        self.suppression = SuppressionService(config.suppression.database, config.events.log_file,
                                              reactor, run_files,
                                              check_interval=config.suppression.check_interval)
        self.suppression.setServiceParent(self)
        self.events.wake_on_write(self.suppression.wake, SUPPRESSING_TYPES)
        self.injector.suppressions = self.suppression.list
    def _stats(self, parts: Parts, reactor: Reactor, run_files: Runner) -> None:
        """
        The statistics store follows the event log from its own cursor, counting in the file
        pool; started after the event log (it may rebuild from it), it never holds up mail.
        It reads on its poll, once a second, not after every write: one transaction and
        one cursor save a second, where a wake per event made a round (and its fsyncs)
        per few messages that competed with the spool's commits.
        """
        self.stats: StatsService | None = None
        if not parts.config.stats.enabled:
            return
        self.stats = StatsService(parts.config.stats.database, parts.config.events.log_file,
                                  clock=reactor, run=run_files)
        self.stats.setServiceParent(self)

    def _smtp(self, parts: Parts, reactor: Reactor, run_passwords: Runner) -> None:
        """The stop drain, the AUTH users and guard, and one listener per configured table."""
        config = parts.config
        smtp = config.smtp
        self.smtp_listeners: list[Service] = []
        self.smtp_limits = ConnectionLimits()
        # Stopped right after the listeners: messages already received get their decision,
        # events and reply before delivery and the event log stop.
        self.smtp_drain = SessionDrain(self.smtp_limits, self.injector, reactor)
        self.smtp_drain.setServiceParent(self)
        self.users = None
        if smtp.users_file:
            self.users = UsersFileChecker(smtp.users_file, run_passwords, parts.users)
        self.auth_guard = AuthGuard(reactor, smtp.auth_attempts_per_second, smtp.auth_failure_backoff,
                                    smtp.auth_failure_backoff_max)
        for listener in smtp.listeners:
            factory = listener_factory(listener, self.injector, config.node.hostname, smtp,
                                       self.smtp_limits, self.users,
                                       tls=parts.listener_tls.get(listener.name), clock=reactor,
                                       auth_guard=self.auth_guard, postmaster=config.node.postmaster)
            svc = strports.service(listener.endpoint, factory, reactor=reactor)
            svc.setName(f"smtp:{listener.name}")
            svc.setServiceParent(self)
            self.smtp_listeners.append(svc)

    def _engagement(self, parts: Parts, run_files: Runner) -> None:
        """What the tracker makes of its clients: prefetch networks, MaxMind database, click rules."""
        c = parts.config.engagement_tracker
        self.engagement = Engagement(parts.prefetch_networks, parts.geoip, c.click_prefetch_seconds)
        self._run_files = run_files

    def reload_prefetch_networks(self) -> defer.Deferred | None:
        """
        Re-read ``prefetch_networks_file`` (on SIGHUP) in the file pool: Apple's list is
        hundreds of thousands of lines. A file that cannot be used keeps the networks in use.
        """
        path = self.config.engagement_tracker.prefetch_networks_file
        if not path:
            return None

        def use(networks: Any) -> None:
            self.engagement.prefetch_networks = networks
            log.info("prefetch networks re-read from {path}: {count} prefixes", path=path,
                     count=networks.count)

        def keep(failure: Any) -> None:
            if failure.check(NetworksFileError):
                log.error("kept the prefetch networks in use: {error}", error=failure.getErrorMessage())
            else:
                log.failure("kept the prefetch networks in use", failure)

        return self._run_files(read_networks, path).addCallbacks(use, keep)

    def _tracker(self, reactor: Reactor) -> None:
        """The tracker listener; with ``processes`` > 1, children answer beside this process."""
        t = self.config.tracker
        limits = share(t.limits, t.processes)
        self.tracker_site = make_site(self.links, self.events, t.trusted_proxies,
                                      reactor=reactor, limits=limits, engagement=self.engagement,
                                      behind_tls=t.endpoint.startswith("ssl:"))
        self.tracker_processes: TrackerProcesses | None = None
        if t.processes > 1:
            self.tracker_processes = TrackerProcesses(
                self.tracker_site, t.endpoint, t.processes, reactor=reactor,
                keyring=lambda: self.links.keyring, node_name=self.config.node.name,
                customer_id=self.config.events.customer_id, trusted_proxies=t.trusted_proxies,
                limits=limits, engagement=engagement_files(self.config.engagement_tracker))
            self.tracker: Service = self.tracker_processes
        else:
            self.tracker = strports.service(t.endpoint, self.tracker_site, reactor=reactor)
        self.tracker.setName("tracker")
        self.tracker.setServiceParent(self)

    def _admin(self, parts: Parts, reactor: Reactor) -> None:
        """
        Health, metrics and the admin listener (``[admin]``; none when its endpoint is "").

        Counts of events are taken as the event log writes them; the rest is read
        from the parts when ``/metrics`` is asked for.
        """
        self.health = Health()
        self.health.add("spool", self._spool_problem)
        self.health.add("events", self._event_log_problem)
        for svc in (*self.smtp_listeners, self.tracker):
            self.health.add(svc.name, functools.partial(_listener_problem, svc))
        self.metrics = CollectorRegistry(auto_describe=False)
        self.events.observe(EventCounters(self.metrics))
        latency = tracker_latency(self.metrics)
        self.tracker_site.on_answered = latency.observe
        if self.tracker_processes is not None:  # their answers, in the same buckets
            self.tracker_processes.latency_buckets = latency.buckets
            latency.add(self.tracker_processes.latency)
        self.metrics.register(self._readings())
        self.admin_site: AdminSite | None = None
        self.admin_listener: Service | None = None
        api: dict[bytes, IResource] = {  # /api/v1/<name>: one line per resource
            b"suppression-list": SuppressionList(self.suppression),
            b"queue": QueueResource(self.delivery, reactor),
            b"events/message": EventSearchResource(self.config.events.log_file, self._run_cpu, reactor),
        }
        if self.config.stats.enabled:
            api[b"metrics/deliverability"] = DeliverabilityResource(self.config.stats.database,
                                                                    self._run_files, reactor)
        if parts.admin_token is None:
            return
        dashboard = None
        if self.config.stats.enabled:
            data = StoreData(self.config.stats.database, self.config.events.log_file, self._queue_view)
            dashboard = Dashboard(data, dashboard_runner(self._run_files), now=reactor.seconds).root
        self.admin_site = make_admin_site(parts.admin_token, self.health, self.metrics, api,
                                          dashboard, reactor=reactor)
        self.admin_listener = strports.service(self.config.admin.endpoint, self.admin_site,
                                               reactor=reactor)
        self.admin_listener.setName("admin")
        self.admin_listener.setServiceParent(self)

    def _queue_view(self) -> list[DestinationQueue]:
        """The dashboard's queue by recipient domain, read on the reactor thread where it lives."""
        return queue_by_domain(self.delivery.listing())

    def _readings(self) -> Readings:
        """What ``/metrics`` reads from the parts at each scrape."""
        readings = Readings()
        readings.gauge("queue_copies", "Copies not yet final, by destination.",
                       self.delivery.depth_by_destination, label="destination")
        readings.gauge("smtp_connections", "Open injection sessions, by listener.",
                       lambda: {svc.name.removeprefix("smtp:"): _injection_factory(svc).budget.open
                                for svc in self.smtp_listeners}, label="listener")
        readings.counter("smtp_auth_failed", "Failed SMTP AUTH logins.",
                         lambda: self.auth_guard.failed_logins)
        readings.counter("smtp_auth_refused", "AUTH attempts refused before a password check.",
                         lambda: {"busy": self.auth_guard.refused_busy,
                                  "backing_off": self.auth_guard.refused_backing_off}, label="reason")
        readings.gauge("webhook_batches_waiting", "Sealed webhook batches not yet accepted, by webhook.",
                       lambda: {w.config.name: len(w.batches) for w in self.webhooks.webhooks},
                       label="webhook")
        readings.gauge("webhook_failures_in_a_row", "Failed posts in a row, by webhook.",
                       lambda: {w.config.name: w.failures for w in self.webhooks.webhooks}, label="webhook")
        readings.counter("event_log_lost", "Events the event log could not write.",
                         lambda: self.events.lost)
        readings.gauge("event_log_failing", "1 while the event log's last write failed.",
                       lambda: int(self.events.failing))
        self._tracker_readings(readings)
        self._helper_readings(readings)
        return readings

    def _helper_readings(self, readings: Readings) -> None:
        """What the helper processes did, counted here where their jobs are handed out."""
        helpers = self.helpers
        if helpers is None:
            return
        readings.gauge("helper_processes", "Helper processes running.", lambda: len(helpers.helpers))
        readings.counter("helper_restarts", "Helper processes started to replace one that ended.",
                         lambda: helpers.restarts)
        readings.counter("helper_jobs", "Jobs handed to helpers, by kind; one sent again (its "
                         "helper ended, or no longer held its message) counts again.",
                         lambda: dict(helpers.jobs_sent), label="kind")
        readings.counter("helper_jobs_in_owner", "Jobs run in this process's threads while no "
                         "helper could take them, by kind.",
                         lambda: dict(helpers.jobs_in_owner), label="kind")
        readings.counter("helper_job_failures", "Jobs that failed in a helper, or ended helpers "
                         "twice and were given up.", lambda: dict(helpers.failures), label="reason")
        readings.gauge("helper_jobs_waiting", "Jobs waiting for a helper's window.",
                       lambda: helpers.waiting)

    def _tracker_readings(self, readings: Readings) -> None:
        """The tracker's counters: this process's, plus what its tracker processes report."""
        site = self.tracker_site
        children = self.tracker_processes

        def total(name: str, own: int) -> int:
            return own + (children.total(name) if children is not None else 0)

        readings.gauge("tracker_connections", "Open tracker connections.",
                       lambda: total("connections", site.connections.total))
        readings.counter("tracker_connections_refused", "Tracker connections refused over a limit.",
                         lambda: total("refused", site.connections.refused))
        readings.counter("tracker_connections_evicted", "Waiting tracker connections closed to make room.",
                         lambda: total("evicted", site.connections.evicted))
        readings.counter("tracker_hits_suppressed", "Repeated tracker hits answered without events.",
                         lambda: site.limiter.suppressed if site.limiter is not None else 0)
        if children is not None:
            readings.gauge("tracker_processes", "Tracker processes answering, this one included.",
                           lambda: 1 + len(children.children))
            readings.counter("tracker_process_restarts", "Tracker processes replaced after they ended.",
                             lambda: children.restarts)
            readings.counter("tracker_events_dropped",
                             "Events tracker processes dropped while the appliance did not take them.",
                             lambda: children.total("dropped"))

    def _spool_problem(self) -> str | None:
        if not self.spool_lock.held:
            return "the spool is not locked by this process"
        if not os.access(self.spool.active, os.W_OK | os.X_OK):
            return f"{self.spool.active} is not writable"
        return None

    def _event_log_problem(self) -> str | None:
        if not self.events.running:
            return "not open"
        if self.events.failing:
            return f"writes are failing ({self.events.lost} event(s) lost)"
        return None

    def _sighup(self, reactor: Reactor, handle_sighup: bool) -> None:
        """
        SIGHUP reopens the event log (logrotate's ``postrotate``) and re-reads the link key
        file, so a retired key stops verifying without a restart: one handler for both.
        Added last, it is stopped first, so no reopen comes after the event log closed.
        """
        self.sighup: SighupService | None = None
        if handle_sighup:
            self.sighup = SighupService(reactor)
            self.sighup.add(self.events.reopen)
            keys_file = self.config.links.keys_file
            self.sighup.add(lambda: self.links.reload(keys_file))
            self.sighup.add(self.reload_prefetch_networks)
            if self.tracker_processes is not None:  # after the re-reads: the keys and networks they made
                self.sighup.add(self.tracker_processes.send_keys)
                self.sighup.add(self.tracker_processes.reload_networks)
            self.sighup.setServiceParent(self)


def _listener_problem(svc: Service) -> str | None:
    """A listener that should be listening and is not (its port never opened, or closed)."""
    factory = svc.factory  # type: ignore[attr-defined]
    return None if factory.numPorts > 0 else "not listening"


def _injection_factory(svc: Service) -> Any:
    """An SMTP listener's factory, inside its TLS wrapper for ``tls = "implicit"``."""
    factory = svc.factory  # type: ignore[attr-defined]
    return getattr(factory, "wrappedFactory", factory)
