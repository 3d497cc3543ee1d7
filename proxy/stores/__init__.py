"""Redis: the connection guard, the topologies, and what is stored.

    guard.py        Store: every call bounded in time, Redis errors turned into StoreUnavailable, the bypass after
                    a failure; connect() picks the client
    topology.py     the redis-py client of each type (single, cluster, sentinel) and what differs between them
    checks.py       start-up checks of each store's eviction policy and persistence
    slots.py        a batch of cache reads routed across a cluster's hash slots
    rediskeys.py    every Redis key the proxy uses, built in one place
    cache.py        the embedding cache in Redis (MGET in, pipelined SET out); entrycodec.py its value format
    localcache.py   the in-process tier
    generations.py  per-model purge generations; cachestats.py what `cache stats` reports

The state kept in Redis (keys.py, teams.py, quota.py, usage.py) sits beside the service that uses it.
"""
