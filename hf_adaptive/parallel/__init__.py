"""Adaptive parallelism mechanism: plans, launch, sharding, the multi-process engine and serving loop."""
