"""keeper_train: keeper's Ray jobs (run in a Ray job driver and on Ray workers)."""
