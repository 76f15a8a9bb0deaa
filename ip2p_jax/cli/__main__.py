import sys

from ip2p_jax.cli import main

sys.exit(main())
