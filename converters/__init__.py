"""Import trained PyTorch segmentation networks (nnU-Net v2, MONAI, segmentation_models_pytorch), without torch.

Public API:

* :func:`converters.checkpoint.load_checkpoint`, :class:`~converters.checkpoint.UnsafeCheckpointError`:
  a torch-free, code-free reader for ``.pth``/``.pt``, ``.safetensors`` and ``.npz``;
* :func:`converters.convert.convert`: an nnU-Net folder, a MONAI bundle or a bare checkpoint -> a
  scribblejax model folder (``scribblejax convert`` on the command line, see :mod:`converters.cli`);
* Flax NNX networks: :mod:`converters.nnunet` (``PlainConvUNet``, ``ResidualEncoderUNet``),
  :mod:`converters.monai_nets` (``BasicUNet``, ``UNet``, ``SegResNet``) and
  :mod:`converters.smp_unet` (segmentation_models_pytorch ``Unet`` with ResNet encoders).
"""
