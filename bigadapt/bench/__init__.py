"""Benchmarks: scripts that print ratios measured side by side in one run. No test asserts a time."""


def save_json(path: str | None, result: dict) -> dict:
    """`--json PATH`: also write the numbers there; returns them."""
    if path:
        import json
        with open(path, "w") as f:
            json.dump(result, f, indent=1)
    return result
