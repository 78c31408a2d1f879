"""Where and how shards are computed: the plan, shard jobs and their store, staged rows, runners, memory."""
