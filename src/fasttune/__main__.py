import sys

from fasttune.cli.main import main

sys.exit(main())
