"""Models: network builders (segmentation-models-pytorch, timm), losses, metrics, LightningModules.

Import the submodules you need (e.g. ``covidqu.models.networks``); this package imports nothing
heavy on its own so that ``import covidqu.models`` stays cheap.
"""
