"""The inference runtime: model loading, the token generator, the model pool, hardware probes.

Plain Python with no ORM, so it can be tested and benchmarked alone. The Celery tasks in
``workers.tasks`` are the seam between Django and this package.
"""
