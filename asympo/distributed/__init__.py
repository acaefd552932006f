"""The data-parallel learner: N ranks (torchrun or Ray actors), the model sharded by FSDP2, rank 0 driving it.

Rank 0 runs the whole `asympo train` loop (rollouts, rewards, evaluation, metrics, checkpoints) with a
`ShardedLearner`; every other rank only follows it, running the learner's collective parts (steps, weight
gathers, checkpoint shards) as rank 0 announces them. See docs/distributed.md.
"""
