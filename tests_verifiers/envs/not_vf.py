"""Not a verifiers taskset: a module with no Taskset in `__all__`."""

__all__ = ["nothing"]
nothing = 1
