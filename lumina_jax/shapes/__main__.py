import sys

from lumina_jax.__main__ import quiet_environment

quiet_environment()  # before JAX loads (as `python -m lumina_jax`)

from lumina_jax.shapes.build import main  # noqa: E402

sys.exit(main())
