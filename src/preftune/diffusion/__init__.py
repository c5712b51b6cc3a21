"""Diffusion models: preference losses, samplers and solvers built on `diffusers`."""
