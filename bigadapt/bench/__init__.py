"""Benchmarks: scripts that print ratios measured side by side in one run. No test asserts a time."""
