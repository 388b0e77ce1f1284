"""vidit: video diffusion transformers in JAX/Flax."""
from vidit import host_malloc as _host_malloc

# Before JAX starts its worker threads: see host_malloc for the measured effect.
_host_malloc.tune()
