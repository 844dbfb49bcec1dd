"""``python -m workers --node NAME [...]``: starts this node's Celery worker (see ``node.main``)."""

from node.main import main

if __name__ == "__main__":
    main()
