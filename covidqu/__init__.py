"""covidqu: an experiment framework for the COVID-QU-Ex chest X-ray dataset."""

__version__ = "0.1.0"
