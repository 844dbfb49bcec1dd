"""A worker process and its children live and die together."""

from __future__ import annotations

import signal

import psutil

from llmplatform import devstack
from tests.environment import RUN


def test_the_embedded_beat_dies_with_a_worker_killed_by_sigkill(platform, tmp_path):
    worker = devstack.start_worker(f"beat-{RUN}", env=devstack.child_env(), log_dir=tmp_path, extra=["--beat"])
    try:
        def beats() -> list[psutil.Process]:  # not the start-up test decode's child
            return [child for child in psutil.Process(worker.popen.pid).children()
                    if "selftest" not in " ".join(child.cmdline())]

        devstack.wait_until(beats, timeout=60, what="the embedded beat process", processes=(worker,))
        (beat,) = beats()
        worker.popen.send_signal(signal.SIGKILL)
        worker.popen.wait(timeout=10)
        gone, alive = psutil.wait_procs([beat], timeout=10)
        assert not alive, f"beat {beat.pid} outlived its worker"
    finally:
        worker.stop()
