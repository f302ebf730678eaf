"""`python -m gelf` runs the server, like the `gelf` command."""

import sys

from gelf.cli import main

sys.exit(main())
