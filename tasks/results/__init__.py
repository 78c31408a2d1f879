"""What a run produces from the shards: the values table and global importance, plots, the report, the summary."""
