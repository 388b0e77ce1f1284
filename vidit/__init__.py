"""vidit: video diffusion transformers in JAX/Flax.

Importing the package does nothing to the process: the command-line entry points apply their
process-wide settings themselves (vidit/cli.py).
"""
