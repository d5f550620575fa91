"""The built-in builder table: one module per builder, each registered with tfds once, under its table name
(the name is also the dataset's directory under the data dir, so it must not drift)."""
import tensorflow_datasets as tfds

from diffusion_jax.data import sources


def test_each_builder_lives_in_its_own_module_and_is_registered_under_its_table_name():
  for name, builder in sources.BUILDERS.items():
    assert builder.name == name
    assert builder.__module__ == f"diffusion_jax.data.{name}"
    assert tfds.builder_cls(name) is builder
