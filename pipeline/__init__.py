"""`pipeline`: the offline stage that turns video datasets into frame-window shards."""
