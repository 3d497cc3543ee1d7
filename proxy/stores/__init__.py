"""Redis topologies and the checks run before serving: `topology` builds a client of any type (single, cluster,
sentinel) and knows what differs between them; `checks` reads each store's eviction policy and persistence;
`slots` routes a batch of cache reads across a cluster's hash slots."""
