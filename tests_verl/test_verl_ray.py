"""A fresh Ray worker (where verl runs its actors) sees asympo's losses after `import verl` alone."""

import pytest

ray = pytest.importorskip("ray")


def test_a_ray_worker_sees_the_losses():
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:

        @ray.remote
        def registry() -> list[str]:
            import sys

            assert "asympo.integrations.verl" not in sys.modules  # nothing imported it by hand here
            from verl.trainer.ppo.core_algos import POLICY_LOSS_REGISTRY

            return sorted(POLICY_LOSS_REGISTRY)

        names = ray.get(registry.remote(), timeout=120)
    finally:
        ray.shutdown()
    assert {"asympo", "spo", "pg"} <= set(names)
