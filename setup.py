"""Packaging shim. All metadata lives in pyproject.toml.

This file must not import torch at module level: pip builds in an isolated
environment, and importing torch here would make it install a CUDA build of torch
into that environment on every install.
"""

from setuptools import setup

setup()
