"""Training-time reading of the shards: which samples each rank takes (sampling), reading exactly those
(loader), and weighted mixtures of datasets (mixture). Runs inside the training workers (torch)."""
