"""The recipes: one get_config(arg) file each; installed as diffusion_jax.configs (setup.py)."""
