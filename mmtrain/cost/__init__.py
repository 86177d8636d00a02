"""Cost accounting: the run ledger, FLOPs estimates, GPU-hour reports and predictions."""
