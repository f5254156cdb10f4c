"""A napari plugin that makes scribblejax's loop live: draw labelled scribbles, press Refine, see the
network's segmentation honour them.

The widget (:class:`scribblejax.napari.widget.ScribbleWidget`, manifest ``napari.yaml``) drives the same
workflow functions as ``scribblejax refine --session`` (:mod:`scribblejax.napari.core`), so its rounds
go through the CLI's pipeline (crop, spacing, patches) and its session folder continues on the command
line. ``pip install "scribblejax[napari]"``, then ``scribblejax view IMAGE --model M``.

Nothing here imports napari or Qt: :mod:`scribblejax.napari.core` needs neither, and ``widget`` imports
them when it is loaded.
"""
