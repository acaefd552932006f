"""On the PYTHONPATH of the processes a verifiers environment starts (its tool servers, each in a session of
its own, which no signal to ours reaches): each watches the asympo process named by ASYMPO_PARENT_PID and
ends when it dies, SIGKILL included (asympo.lifetime)."""

try:
    from asympo.lifetime import exit_with_launcher

    exit_with_launcher()
except Exception:  # never break the program it is loaded into
    pass
