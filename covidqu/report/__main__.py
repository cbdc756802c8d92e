"""``python -m covidqu.report``: see :mod:`covidqu.report`."""

import sys

from covidqu.report import main

if __name__ == "__main__":
    sys.exit(main())
