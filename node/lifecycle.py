"""The worker bootstep that registers this node and keeps its heartbeat going."""

from __future__ import annotations

import logging
import socket
import threading
import time

import psutil
from celery import bootsteps
from django.conf import settings
from django.db import close_old_connections

from workers.selftest import SelfTest, SelfTestResult, selftest_advice, selftest_model

LOADED_CHECK_SECONDS = 0.5  # how often the heartbeat thread looks for a change in the loaded models

logger = logging.getLogger(__name__)


def _health_log(health: SelfTestResult) -> str:
    """Log the start-up test decode's outcome; returns the node's health error (empty: it may take requests)."""
    if not health.tested:
        logger.warning("self-test: %s", health.note)
        return ""
    if health.ok:
        logger.info("self-test passed in %.2f s: %s read a %d-token prompt and generated %d token(s)",
                    health.elapsed_s, health.model, health.prompt_tokens, health.completion_tokens)
        return ""
    error = f"{health.error}; {selftest_advice(health)}"
    logger.error("self-test FAILED: %s. This node registers as unhealthy: it keeps heartbeating and gets no "
                 "requests until a restarted worker passes the test.\nllama.cpp system info: %s\n"
                 "last stderr lines of the test decode:\n%s", error, health.system_info or "(not reported)",
                 "\n".join(health.stderr_tail) or "(none)")
    return error


class NodeLifecycle(bootsteps.StartStopStep):
    """Register the node when the worker starts; heartbeat until it stops; go offline on stop."""

    requires = {"celery.worker.components:Pool"}

    def __init__(self, worker, **kwargs):
        super().__init__(worker, **kwargs)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._registration: dict = {}

    def start(self, worker) -> None:
        from apps.models.services import model_register_bundled
        from apps.nodes.services import node_register
        from node.config import gpu_index, node_config, node_liveness, node_name
        from workers.bundled import BundledModelMissing
        from workers.hardware import hardware_snapshot
        from workers.runner import llama_options

        # Proves that this node can infer before it takes traffic; runs in a child process while
        # the worker registers the bundled model and reads its hardware.
        selftest = SelfTest(model=selftest_model(settings.MODELS_DIR), options=llama_options(node_config()),
                            timeout=settings.LLMP_SELFTEST_TIMEOUT)
        try:
            model_register_bundled()
        except BundledModelMissing as exc:  # a node can serve other models without it
            logger.warning("%s", exc)
        hardware = {**hardware_snapshot(models_dir=settings.MODELS_DIR, n_threads=settings.LLMP_N_THREADS),
                    "own_model_cache": bool(settings.LLMP_SERVER_URL)}
        health = selftest.result()
        health_error = _health_log(health)
        # Kept for the heartbeat, which registers the node again if an operator deletes it while it runs.
        self._registration = {"name": node_name(), "hostname": socket.gethostname(), "gpu_index": gpu_index(),
                              "hardware": hardware, "health_error": health_error, "health_detail": health.as_dict()}
        node = node_register(**self._registration)
        logger.info("node %s registered%s, consuming queue %s", node.name, " as UNHEALTHY" if health_error else "",
                    node.queue)
        from apps.jobs.services import job_recover_for_node
        from node.config import load_failures_restore

        if recovered := job_recover_for_node(node=node):
            logger.info("redelivered %d job(s) this node was running when it last stopped", recovered)
        if failed := load_failures_restore():
            logger.warning("%d model(s) failed to load on this node before and stay off it until their file changes "
                           "or the mark is cleared", failed)
        self._thread = threading.Thread(target=self._beat, name="node-heartbeat", daemon=True)
        self._thread.start()
        # Before the consumer starts (it is the last step): no request runs before the gateway can see it.
        # Deleted by ``node.main`` once the pool has drained, or expired if the process dies.
        node_liveness().start()

    def _beat(self) -> None:
        """Every LLMP_HEARTBEAT_INTERVAL: mark the node alive and store a metrics sample."""
        from apps.fit.services import measurement_record
        from apps.nodes.services import node_heartbeat_record, node_register
        from node.config import gpu_index, load_failures_recheck, loaded_model_ids, node_name, node_pool
        from workers import calibration
        from workers.metrics import metrics_sample

        psutil.cpu_percent(interval=None)  # starts the CPU-use measurement the first sample reads
        # A change in the loaded models is told at once, not at the next beat: until the gateway sees a
        # model loaded here it places that model's requests as if it were not (on another node, perhaps).
        check = min(LOADED_CHECK_SECONDS, settings.LLMP_HEARTBEAT_INTERVAL)
        beaten_at, told = time.monotonic(), None
        while not self._stop.wait(check):
            try:
                loaded = loaded_model_ids()
                if loaded == told and time.monotonic() - beaten_at < settings.LLMP_HEARTBEAT_INTERVAL:
                    continue
                beaten_at, told = time.monotonic(), loaded
                close_old_connections()
                sample = metrics_sample(requests_in_flight=node_pool().in_flight(), gpu_index=gpu_index())
                recorded = node_heartbeat_record(name=node_name(), loaded_models=loaded, metrics=sample,
                                                 runners={"runners": node_pool().runners(), "exits": node_pool().exits})
                if not recorded:
                    logger.warning("node %s was deleted while its worker runs; registering it again", node_name())
                    node_register(**self._registration)
                for measured in calibration.drain():
                    measurement_record(node_name=node_name(), **measured)
                load_failures_recheck()  # a model that failed to load here, with a new file since: try it again
            except Exception:
                logger.exception("heartbeat failed; retrying in %ss", settings.LLMP_HEARTBEAT_INTERVAL)

    def stop(self, worker) -> None:
        from apps.nodes.services import node_mark_offline
        from node.config import node_name, node_pool

        # A warm shutdown: streams the runners are serving finish (the consumer has stopped taking
        # new ones), then the runners stop.
        if not node_pool().drain(timeout=settings.LLMP_SHUTDOWN_DRAIN_SECONDS):
            logger.warning("stopping with %d request(s) still running", node_pool().in_flight())
        node_pool().close()
        self._stop.set()
        try:
            close_old_connections()
            node_mark_offline(name=node_name())
        except Exception:
            logger.exception("could not mark node offline")
