"""Imported at start-up by every Python process with this folder on PYTHONPATH: when DISTLM_TEST_WRITE_DELAY is set,
each checkpoint file is written that many seconds late. tests/test_fault_tolerance.py forwards both variables to a
run's Ray workers (cluster.forward_env), so a SIGTERM reaches the driver while a background write is slow."""

import os

if os.environ.get("DISTLM_TEST_WRITE_DELAY"):
    import time

    from distlm.checkpoint import writer

    _write, _delay = writer.write_durably, float(os.environ["DISTLM_TEST_WRITE_DELAY"])

    def _slow(*args):
        time.sleep(_delay)
        _write(*args)

    writer.write_durably = _slow
