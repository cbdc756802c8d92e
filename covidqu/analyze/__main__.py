"""``python -m covidqu.analyze``: see :mod:`covidqu.analyze`."""

from covidqu.analyze import main

if __name__ == "__main__":
    main()
