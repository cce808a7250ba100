"""Plotly figures and ipywidgets built from nbgpu objects: they draw data and compute nothing of their own."""
