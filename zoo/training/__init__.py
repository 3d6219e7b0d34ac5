"""The one train loop (ARCHITECTURE.md, "The train loop"): mesh and sharding rules,
optimizer, tasks, checkpointing, metrics, and the loop itself."""
