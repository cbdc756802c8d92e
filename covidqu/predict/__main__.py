"""``python -m covidqu.predict``: see :mod:`covidqu.predict`."""

from covidqu.predict import main

if __name__ == "__main__":
    main()
