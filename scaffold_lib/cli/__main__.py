"""`python -m scaffold_lib.cli`, as the `scaffold` script."""

import sys

from scaffold_lib.cli import main

sys.exit(main())
