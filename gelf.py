#!/usr/bin/env python3
"""Run gelf from a checkout: `sudo python gelf.py --host 0.0.0.0 7001`."""

import sys

from gelf.cli import main

if __name__ == "__main__":
    sys.exit(main())
