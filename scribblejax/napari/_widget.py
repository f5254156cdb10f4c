"""The widget's old module name, kept for ``benchmarks/napari_latency.py`` until it imports
:mod:`scribblejax.napari.widget`."""

from scribblejax.napari.widget import SCRIBBLES, SEGMENTATION, ScribbleWidget  # noqa: F401
