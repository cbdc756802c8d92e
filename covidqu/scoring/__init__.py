"""Figures from predictions and truths: COVID-19 detection (:mod:`~covidqu.scoring.detection`),
severity as the infected share of the lung and its grade (:mod:`~covidqu.scoring.severity`),
calibration (:mod:`~covidqu.scoring.calibration`) and their plots (:mod:`~covidqu.scoring.plots`).
Plain arrays in, numbers and PNG files out: nothing here knows the data or the models.
"""
