"""`python -m gradflow.cli ...`: the `gradflow` command (how tests and experiments start it in
subprocesses, e.g. `distributed.local_processes`)."""

import sys

from gradflow.cli.app import main

if __name__ == "__main__":
    sys.exit(main())
