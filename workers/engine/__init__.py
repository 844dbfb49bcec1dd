"""The inference engine: a runner process per loaded model that batches all of its streams.

``model`` loads weights and vocabulary once; ``batch`` is the continuous-batching scheduler over
one llama.cpp context; ``sampling`` the per-sequence sampler chains; ``embedding`` batched
embeddings in a second context on the same weights; ``process`` the runner process itself;
``supervisor`` the worker's side that starts, feeds and watches runners; ``memory`` what a runner
will hold, for the node's budget.
"""
