"""A budget of decoded pixels in flight across workers: bounded memory at camera sizes.

A worker holds its image's pixel count from decode to the last deliverable.
Two 100 MP files never decode at once under a 120 MP budget; a single file
over the budget is never refused: it waits until nothing else is in flight and
then runs alone.
"""
from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Iterator


class PixelBudget:
    def __init__(self, max_pixels: int):
        self.max_pixels = max(1, int(max_pixels))
        self.in_flight = 0
        self.peak = 0  # the most pixels ever held at once (tests, status)
        self._cv = threading.Condition()

    @contextmanager
    def hold(self, pixels: int) -> Iterator[None]:
        pixels = max(0, int(pixels))
        with self._cv:
            while self.in_flight and self.in_flight + pixels > self.max_pixels:
                self._cv.wait()
            self.in_flight += pixels
            self.peak = max(self.peak, self.in_flight)
        try:
            yield
        finally:
            with self._cv:
                self.in_flight -= pixels
                self._cv.notify_all()
