"""matplotlib for the PNGs timo_hf writes (quicklooks, loss curves, benchmark figures)."""


def pyplot():
    """`matplotlib.pyplot`, switched to the non-interactive Agg backend: the figures are written to files, never
    shown, and no display is needed. Imported on first use, so that code which writes no figure does not pay for
    matplotlib's import."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib import pyplot as plt

    return plt
