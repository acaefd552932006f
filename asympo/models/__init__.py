"""Policy models: the tiny built-in one and anything transformers can load."""
