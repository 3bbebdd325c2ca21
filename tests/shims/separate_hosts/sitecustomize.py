"""Put on PYTHONPATH only by tests/test_distributed.py's two-"node" launch on
one host. Separate machines have separate /dev/shm; two nodes on one host
share it, and MosaicML streaming's local leaders (one per node) would pick
the same shared-memory prefix at the same barrier and collide ("File exists:
'/000000_locals'"). Here node N's prefixes start at N * 500000, which is
what a host of its own gives it."""

import os

_node = int(os.environ.get("NODE_RANK", "0"))
if _node:
    import itertools

    import streaming.base.shared.prefix as _prefix

    _prefix._each_prefix_int = lambda: itertools.count(_node * 500000)
