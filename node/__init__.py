"""The node side: the Celery worker of one node.

Its tasks, registration, heartbeat and self-test wiring, and the entry point of
``python -m workers``. It calls the apps' services and drives the runtime in ``workers``;
it has no inference code of its own.
"""
