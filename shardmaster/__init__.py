"""The Raft-replicated ShardMaster: numbered shard maps, Join/Leave/Move/Query."""
