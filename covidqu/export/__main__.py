"""``python -m covidqu.export``: see :mod:`covidqu.export`."""

from covidqu.export import main

if __name__ == "__main__":
    main()
