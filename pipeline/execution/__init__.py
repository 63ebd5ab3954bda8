"""Execution: a config becomes a plan of work units, run by Ray actors that hold models."""
