"""The inference runtime: model loading, the token generator, the model pool, hardware probes.

Plain Python with no Django, so it can be tested and benchmarked alone. The Celery tasks in
``node.tasks`` are the seam between Django and this package.
"""
