"""A numpy Generator stand-in with hand-chosen draws, for tests that place mask blocks by hand."""

import numpy as np


class ScriptedRng:
    """``uniform`` and ``integers`` return the given draws in order, each checked to lie in the range asked for;
    ``choice`` (the random fill after the blocks) comes from a real generator seeded 0."""

    def __init__(self, uniforms, integers):
        self.uniforms, self.ints = list(uniforms), list(integers)
        self.fill = np.random.default_rng(0)

    def uniform(self, low, high):
        value = self.uniforms.pop(0)
        assert low <= value <= high
        return value

    def integers(self, low, high):
        value = self.ints.pop(0)
        assert low <= value < high
        return value

    def choice(self, *args, **kwargs):
        return self.fill.choice(*args, **kwargs)
