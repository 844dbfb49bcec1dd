"""Background tasks (llmplatform/background.py): a detached task does its sync work on one long-lived
thread, whichever request started it, and after that request has ended."""

from __future__ import annotations

import asyncio
import threading

from asgiref.sync import ThreadSensitiveContext, sync_to_async

from llmplatform.background import spawn


def _thread_name() -> str:
    return threading.current_thread().name  # unique per executor thread (an ident can be reused by a later one)


def test_detached_tasks_of_different_requests_share_one_thread_after_their_requests_end():
    async def scenario() -> dict[str, list[str]]:
        threads: dict[str, list[str]] = {"attached": [], "detached": []}
        for _ in range(2):  # two requests, one after the other, each leaving work behind
            ended = asyncio.Event()

            async def after_the_request(into: list[str]) -> None:
                await ended.wait()
                for _ in range(2):
                    into.append(await sync_to_async(_thread_name)())

            async with ThreadSensitiveContext():  # a request, as the ASGI guard opens it
                attached = spawn(after_the_request(threads["attached"]))
                detached = spawn(after_the_request(threads["detached"]), detached=True)
            ended.set()
            await asyncio.gather(attached, detached)
        return threads

    threads = asyncio.run(scenario())
    # Work left in a request's own context gets a thread (and a database connection) per request;
    # detached, it all goes to one thread, where a connection lasts.
    assert len(threads["attached"]) == 4 and len(set(threads["attached"])) == 2
    assert len(threads["detached"]) == 4 and len(set(threads["detached"])) == 1
    assert not set(threads["detached"]) & set(threads["attached"])
