"""Networks: the EDM/ADM UNet with EDM preconditioning, layer naming, and checkpoint conversion."""
from .edm import DhariwalUNet, EDMPrecond, digits_unet_kwargs, imagenet64_adm_kwargs, list_layers, resolve_layer

__all__ = ["DhariwalUNet", "EDMPrecond", "digits_unet_kwargs", "imagenet64_adm_kwargs",
           "list_layers", "resolve_layer"]
