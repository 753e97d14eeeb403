"""The synthetic shapes world and the small bundled default model trained on it.

- :mod:`lumina_jax.shapes.spec`: vocabulary, scenes, rendering, captions, held-out combinations;
- :mod:`lumina_jax.shapes.tfds_builder`: the ``shapes_world`` TFDS builder (array_record);
- :mod:`lumina_jax.shapes.components`: tokenizer from the dataset vocabulary, tiny frozen Gemma-2,
  pixel-space identity autoencoder stage (exact FLUX-architecture AutoencoderKL weights; the pixel recipe's);
- :mod:`lumina_jax.shapes.vae_train`: the trained f8 autoencoder stage of the shipped model;
- :mod:`lumina_jax.shapes.checker`: deterministic colour / shape / position checker;
- :mod:`lumina_jax.shapes.build`: ``python -m lumina_jax.shapes prepare|train-vae|train-text-encoder|assemble``.
"""
