"""One-line LAWA for training frameworks, one module per framework.

``lawa_optim.integrations.lightning.LAWACallback`` (Lightning, both ``lightning.pytorch``
and ``pytorch_lightning``) and ``lawa_optim.integrations.transformers.use_lawa``
(Hugging Face ``Trainer`` and its subclasses). Nothing here is imported by
``import lawa_optim``: each module imports its framework when it is imported itself.
"""
