"""Cluster mode: many nodes sharing partitioned Redis Streams (``ENGINE_BROKER=redis://...``).

Nothing here is imported unless a broker URL is configured; ``engine.core``
names ``engine.broker.node`` only when it starts a node (see engine/core/cluster.py).
The package's ``__init__`` stays empty of imports, like ``engine.worker``'s:
the workers load ``engine.broker.fence`` and nothing else of it.
"""
