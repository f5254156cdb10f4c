"""Import trained PyTorch segmentation networks (nnU-Net v2, MONAI, segmentation_models_pytorch), without torch.

Public API:

* :func:`scribblejax.convert.checkpoint.load_checkpoint`,
  :class:`~scribblejax.convert.checkpoint.UnsafeCheckpointError`: a torch-free, code-free reader for
  ``.pth``/``.pt``, ``.safetensors`` and ``.npz``;
* :func:`scribblejax.convert.folder.convert`: an nnU-Net folder, a MONAI bundle or a bare checkpoint -> a
  scribblejax model folder (``scribblejax convert`` on the command line, see :mod:`scribblejax.cli.convert`);
* one converter per library, ``load_weights(model, state, *, source)``, moving a state dict into the Flax
  network of :mod:`scribblejax.models.zoo`: :mod:`scribblejax.convert.nnunet` (also nnU-Net trained-model
  folders), :mod:`scribblejax.convert.monai_nets` and :mod:`scribblejax.convert.smp_unet`;
* :mod:`scribblejax.convert.state_dict`: the strict state-dict reader
  (:class:`~scribblejax.convert.state_dict.StateReader`, :func:`~scribblejax.convert.state_dict.assign`) and the
  torch layouts the converters share.

Which family converts from which original class is stated once, in :mod:`scribblejax.models.families`
(see ``docs/converters.md``).
"""
