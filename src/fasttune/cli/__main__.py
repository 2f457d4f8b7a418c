"""`python -m fasttune.cli`, the form the multi-process launcher and the tests use."""

import sys

from fasttune.cli.main import main

sys.exit(main())
