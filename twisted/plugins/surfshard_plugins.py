"""twistd plugins: ``twistd -n surfshard|shardmaster|surfblock ...``.

``ServiceMaker`` imports the real module only when the plugin is used, so
``twistd --help`` stays fast and a broken optional part cannot hide the others.
"""

from twisted.application.service import ServiceMaker

surfshard = ServiceMaker(
    "SurfShard metadata replica",
    "surfshard.metadata.tap",
    "One replica of a SurfShard metadata group (SurfStore metadata on Raft).",
    "surfshard",
)

shardmaster = ServiceMaker(
    "SurfShard ShardMaster replica",
    "shardmaster.tap",
    "One replica of the SurfShard ShardMaster (the Raft-replicated shard map).",
    "shardmaster",
)

surfblock = ServiceMaker(
    "SurfShard block store",
    "surfshard.blocks.tap",
    "A SurfStore block store: content-addressed blocks by SHA-256.",
    "surfblock",
)
