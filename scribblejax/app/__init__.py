"""Use cases over files: predict, one refinement round, describe a model. Each returns a report; the
command line (:mod:`scribblejax.cli`) and the napari plugin print or show it."""
