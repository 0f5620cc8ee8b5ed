"""`python -m hss_ee_hf.cli`: the same as the `hss-ee` command."""

import sys

from .main import main

sys.exit(main())
