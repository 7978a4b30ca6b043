"""Sharding (DESIGN section 5): logical-axis rule sets, meshes, the one sharding wrapper (`ShardedFunction`),
and multi-process helpers (`distributed`)."""
