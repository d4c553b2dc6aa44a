"""Offline preprocessing stages: videos -> frames -> flow -> shards (one module per stage)."""
