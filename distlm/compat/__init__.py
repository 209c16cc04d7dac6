"""Every place distlm patches or reaches into a dependency's private API, one module per dependency.

Each entry says which upstream gap it covers and the versions it was written for (the ones pyproject.toml pins),
and tests/test_compat.py checks that the gap is still there and the private names still mean what the patch
assumes: an upgrade that fixes the gap or moves the names fails those tests loudly instead of silently
breaking a run or applying a correction twice.

deepspeed.py (DeepSpeed 0.19.8)
    shared_fp32_partitions        ZeRO-3 keeps a second fp32 copy of fp32 weights (a device compared with a string)
    routing_checkpoint_writes     DeepSpeed writes checkpoint files itself, synchronously, from the live tensors: distlm
                                  writes them (durably, or from a host snapshot in the background), and a failed write
                                  on one rank would hang the others in DeepSpeed's barriers
    run_ds_to_universal           the universal-checkpoint converter has no API but its command line; its parallel
                                  phases run on a process pool, which distlm replaces by Ray tasks
    drop_accumulated_gradients    no API forgets the gradients of a step's earlier micro-batches (NaN/spike skips)
ray.py (Ray 2.60)
    stop_local_cluster            ray.shutdown() waits 1 s on the autoscaler monitor of a cluster that never autoscales
    remove_placement_groups       a killed Ray Train controller leaves its placement groups to the driver's job
"""
