"""The lab: benchmark, raw broker baseline, fault suite and the process launcher, run from the
repository root as `python -m lab.<tool>`. One sandbox (sandbox.py) and one HTTP order client
(order_client.py) serve them all. Not in any image."""
