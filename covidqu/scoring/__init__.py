"""Detect, localise and quantify COVID-19 from lung and infection segmentation together.

:mod:`~covidqu.scoring.severity` turns a lung and an infection mask into the infected share of
the lung and a grade; :mod:`~covidqu.scoring.detection` scores detection and severity against the
ground truth.
"""
