"""Job execution: contexts, pools and supervised job processes."""
