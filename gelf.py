#!/usr/bin/env python3
"""Run gelf from a checkout: `sudo python gelf.py --host 0.0.0.0 --enc 7001`.

The seed's usage line runs the system's python, which lacks gelf's dependencies: then this
script re-executes itself with the checkout's own venv (`.venv`, made by `make venv`), or says
in one line how to make it.
"""

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
VENV = os.path.join(HERE, ".venv")


def run():
    try:
        from gelf.cli import main
    except ImportError as err:
        venv_python = os.path.join(VENV, "bin", "python")
        if os.path.realpath(sys.prefix) != os.path.realpath(VENV) and os.access(venv_python, os.X_OK):
            os.execv(venv_python, [venv_python, os.path.abspath(__file__)] + sys.argv[1:])
        sys.stderr.write("gelf: error: gelf's dependencies are not installed (no module %r): run "
                         "'sudo make venv' in %s first\n" % (err.name, HERE))
        return 1
    return main()


if __name__ == "__main__":
    sys.exit(run())
