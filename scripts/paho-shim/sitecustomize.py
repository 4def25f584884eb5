"""Loaded by Python at start-up when scripts/paho.sh runs Eclipse Paho's MQTT 5 suite (PYTHONPATH).

The suite's own __main__ block sets the global `topic_prefix` ("client_test5/") that
test_shared_subscriptions uses; the runner loads the suite without that block, so the test would
fail with a NameError before sending a packet. This sets the same value, and nothing else."""
import runpy

_run_path = runpy.run_path


def _run_path_with_topic_prefix(path, *args, **kwargs):
    loaded = _run_path(path, *args, **kwargs)
    test = loaded.get("Test")
    if test is not None and str(path).endswith("client_test5.py"):
        test.setUpClass.__func__.__globals__.setdefault("topic_prefix", "client_test5/")
    return loaded


runpy.run_path = _run_path_with_topic_prefix
