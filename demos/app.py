"""Run the steer demo from a checkout: ``python demos/app.py [--model M] [--sae S] [--host H] [--port P]``.

The same as ``steer demo`` (same flags, see ``--help``): the page itself lives in
`steer.demo.app` so that the installed ``steer`` command finds it from any
working directory; this file is the runnable entry the repository layout
promises (``demos/`` holds the Gradio apps).
"""

import sys

from steer.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["demo", *sys.argv[1:]]))
