"""Backends of the kernel entry points in :mod:`lawa_optim.ops` (one module each)."""
