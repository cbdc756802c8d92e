"""covidqu: an experiment framework for the COVID-QU-Ex chest X-ray dataset."""

from covidqu.resolvers import register_resolvers

__version__ = "0.1.0"

# The configs in conf/ use these resolvers; registering on import makes any composition that
# imports covidqu (the entry points, tests, notebooks) resolve them.
register_resolvers()
