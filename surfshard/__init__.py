"""SurfShard foundation (wire, config, TLS, keyspace, errors, shard map) and
the replica-group metadata server, block store and SurfStore facade."""

__version__ = "0.1.0"
