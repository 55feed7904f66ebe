"""One module per Ray job: ``python -m keeper_train.jobs.<name> --config FILE [key=value ...]``."""
