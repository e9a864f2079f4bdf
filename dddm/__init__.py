"""Unified Directly Denoising Diffusion Models (uDDDM): the method and its machinery."""
