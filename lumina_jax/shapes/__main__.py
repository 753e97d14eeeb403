import sys

from lumina_jax.shapes.build import main

sys.exit(main())
