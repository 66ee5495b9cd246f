"""Fault injection for the order saga: a seeded schedule of kills and restarts while real orders
run, then a check that no saga was lost and no effect doubled. See `runner.run_scenario`,
`lab/fault_run.py` (the long run) and `tests/test_faults.py` (the short one)."""
