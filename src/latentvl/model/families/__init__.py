"""The backbone families, one module each: the latent model class over the family's transformers model, and
the family's tiny configuration. :mod:`latentvl.model.backbone` names them."""
