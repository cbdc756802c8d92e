"""``python -m covidqu.eval``: see :mod:`covidqu.eval`."""

from covidqu.eval import main

if __name__ == "__main__":
    main()
