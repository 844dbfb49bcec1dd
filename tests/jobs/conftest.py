"""A fake Hugging Face hub and a worker node that downloads from it, for job tests."""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import pytest
from django.utils import timezone

from apps.nodes.models import Node
from llmplatform import devstack
from tests.environment import RUN
from tests.fakehub import FakeFile, FakeHub, FakeRepo
from tests.fixtures.tiny_llama import build_tiny_llama
from workers.bundled import bundled_model_path

GGUF_REPO = "acme/smol-gguf"
GGUF_FILE = "smol.Q4_1.gguf"
BROKEN_FILE = "broken.Q4_0.gguf"
CHECKPOINT_REPO = "acme/tiny-llama"


@pytest.fixture(scope="session")
def hub(tmp_path_factory):
    checkpoint = build_tiny_llama(tmp_path_factory.mktemp("hub-checkpoint") / "tiny-llama")
    repos = [FakeRepo(CHECKPOINT_REPO, [FakeFile(path.name, source=path) for path in sorted(checkpoint.iterdir())]),
             FakeRepo(GGUF_REPO, [
        FakeFile(GGUF_FILE, source=bundled_model_path()),
        FakeFile(BROKEN_FILE, data=b"GGUF\x03\x00\x00\x00" + b"\xff" * 64, lfs=True),
        FakeFile("README.md", data=b"# smol\n"),
    ])]
    with FakeHub(repos) as running:
        yield running


@dataclass
class HubNode:
    """A worker node whose HF_ENDPOINT is the fake hub; it can be killed and started again."""

    name: str
    env: dict
    log_dir: Path
    processes: list = field(default_factory=list)

    @property
    def process(self) -> devstack.Process:
        return self.processes[-1]

    def start(self) -> None:
        before = timezone.now()
        self.processes.append(devstack.start_worker(self.name, env=self.env, log_dir=self.log_dir,
                                                    extra=["--no-default-queue"]))
        devstack.wait_until(lambda: Node.objects.filter(name=self.name, started_at__gte=before - timedelta(seconds=1))
                            .exists(), timeout=60, what=f"node {self.name} to register", processes=(self.process,))

    def kill(self) -> None:
        os.kill(self.process.popen.pid, signal.SIGKILL)
        self.process.popen.wait()

    def stop(self) -> None:
        for process in self.processes:
            process.stop()


# Module-scoped: the node goes offline when its tests end, so it never takes other tests' requests.
@pytest.fixture(scope="module")
def hub_node(django_db_setup, django_db_blocker, hub, platform, tmp_path_factory) -> HubNode:
    node = HubNode(f"hub-{RUN}", devstack.child_env(HF_ENDPOINT=hub.endpoint, HF_HUB_DISABLE_XET="1"),
                   Path(tmp_path_factory.mktemp("hub-node-logs")))
    with django_db_blocker.unblock():
        node.start()
    yield node
    node.stop()
