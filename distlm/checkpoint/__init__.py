"""A run's checkpoints: DeepSpeed's sharded files plus distlm's run state (store), the weights read back
under one-process names (weights), the any-layout universal form (universal), and `distlm checkpoint` (cli)."""
