"""diffusion_jax: JAX/Flax training for the diffusion lineage, up to a packed spacetime video DiT."""
