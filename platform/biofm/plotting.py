"""matplotlib without a display (the Agg backend, set before pyplot loads), and PNGs written to a
local path or a URI. Every picture biofm draws goes through here."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from biofm import storage  # noqa: E402

__all__ = ["plt", "save_png"]


def save_png(fig, location: str, dpi: int = 100) -> None:
    storage.write(location, lambda f: fig.savefig(f, format="png", dpi=dpi))
    plt.close(fig)
