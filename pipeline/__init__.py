"""The click CLI, configs, datasets over shards, training and evaluation."""
