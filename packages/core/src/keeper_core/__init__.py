"""keeper_core."""
