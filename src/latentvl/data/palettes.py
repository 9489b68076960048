"""The colour palettes of the synthetic tasks, in one place.

Each maps an answer letter to the RGB value drawn for it; a task over ``C`` colours uses the first ``C``
entries. The two relay tasks were generated with different palettes (different greens, blues, yellows and
a different eighth colour), and their data sets are reproduced from a seed, so each keeps its own:
changing either would change the data it generates.
"""

from __future__ import annotations

Palette = dict[str, tuple[int, int, int]]

# relay (latentvl.data.tasks.relay): well-separated colours
RELAY_COLOURS: Palette = {
    "R": (230, 25, 25),
    "G": (0, 170, 0),
    "B": (30, 60, 230),
    "Y": (240, 200, 0),
    "C": (0, 200, 210),
    "M": (200, 0, 200),
    "K": (20, 20, 20),
    "O": (255, 130, 0),
}

# relay_bands (latentvl.data.tasks.relay_bands)
RELAY_BANDS_PALETTE: Palette = {
    "R": (230, 25, 25),
    "G": (25, 200, 40),
    "B": (30, 70, 240),
    "Y": (245, 225, 20),
    "M": (200, 40, 210),
    "C": (20, 210, 220),
    "K": (20, 20, 20),
    "W": (250, 250, 250),
}
