"""What each training worker runs: the DeepSpeed engine (engine), the loop (trainer), one optimizer step
and the decisions around it (step), and metrics (metrics)."""
