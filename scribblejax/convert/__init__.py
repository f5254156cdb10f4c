"""Import trained PyTorch segmentation networks (nnU-Net v2, MONAI, segmentation_models_pytorch), without torch.

Public API:

* :func:`scribblejax.convert.checkpoint.load_checkpoint`, :class:`~scribblejax.convert.checkpoint.UnsafeCheckpointError`:
  a torch-free, code-free reader for ``.pth``/``.pt``, ``.safetensors`` and ``.npz``;
* :func:`scribblejax.convert.folder.convert`: an nnU-Net folder, a MONAI bundle or a bare checkpoint -> a
  scribblejax model folder (``scribblejax convert`` on the command line, see :mod:`scribblejax.cli.convert`);
* Flax NNX networks: :mod:`scribblejax.convert.nnunet` (``PlainConvUNet``, ``ResidualEncoderUNet``),
  :mod:`scribblejax.convert.monai_nets` (``BasicUNet``, ``UNet``, ``SegResNet``) and
  :mod:`scribblejax.convert.smp_unet` (segmentation_models_pytorch ``Unet`` with ResNet encoders).
"""
