"""Flax NNX versions of the PyTorch segmentation networks scribblejax imports, one module per library.

* :mod:`scribblejax.models.zoo.nnunet`: nnU-Net v2's ``PlainConvUNet`` and ``ResidualEncoderUNet``;
* :mod:`scribblejax.models.zoo.monai`: MONAI's ``BasicUNet``, ``UNet`` and ``SegResNet``;
* :mod:`scribblejax.models.zoo.smp`: segmentation_models_pytorch's ``Unet`` with ResNet encoders;
* :mod:`scribblejax.models.zoo.layers`: the torch-equivalent layers they are built of.

Each network computes what its torch namesake computes in ``eval()``, channels-last, and takes JSON
constructor arguments (what ``model.json`` stores). The families are registered in
:mod:`scribblejax.models.families`; their weights come from PyTorch checkpoints through
:mod:`scribblejax.convert`. Nothing here imports torch, and the modules are imported only when a model of
their family is built.
"""
