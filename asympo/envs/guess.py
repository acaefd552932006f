"""A number-guessing game: the model guesses, the environment answers `higher` or `lower` until it is right.

It shows turn-level feedback: each reply depends on the model's last turn. The secret comes from the group's
seed, so every episode of a group plays the same game. `chat=true` speaks in chat messages (the chat template
renders them), else in plain text lines.
"""

from __future__ import annotations

import random
import re

from asympo.data.tasks import Problem
from asympo.envs.base import Observation, Step

NUMBER = re.compile(r"-?\d+")


class Guess:
    stop = ("\n",)

    def __init__(self, low: int = 1, high: int = 100, chat: bool = False):
        if low >= high:
            raise ValueError(f"low ({low}) must be below high ({high})")
        self.low, self.high, self.chat = low, high, chat

    def _say(self, text: str) -> Observation:
        return [{"role": "user", "content": text}] if self.chat else text + "\n"

    def reset(self, problem: Problem, seed: int) -> Observation:
        self.secret = random.Random(seed).randint(self.low, self.high)
        return self._say(f"Guess my number from {self.low} to {self.high}.")

    def step(self, text: str) -> Step:
        found = NUMBER.search(text)
        if found is None:
            return Step(observation=self._say("A number, please."), info={"guesses": 1})
        guess = int(found.group())
        if guess == self.secret:
            return Step(reward=1.0, done=True, info={"guesses": 1})
        return Step(observation=self._say("higher" if guess < self.secret else "lower"), info={"guesses": 1})
