"""Token-level precision switching: confidence, weight tiers, controller, graph decode, verified mode."""
