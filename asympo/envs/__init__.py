"""Multi-turn episodes: an environment answers the model's turns; the learner trains on the model's own
token ids, exactly as the engine drew them, with the environment's tokens masked out (token-in/token-out)."""
