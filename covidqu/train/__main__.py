"""``python -m covidqu.train``: see :mod:`covidqu.train`."""

from covidqu.train import main

if __name__ == "__main__":
    main()
