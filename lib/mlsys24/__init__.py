"""mlsys24 — reproductions of the MLSys 2024 papers.

One shared library of kernels and systems (this package) behind one notebook per paper
(``notebooks/NN_slug.ipynb``). The core imports with torch + numpy only: no Jupyter, no
plotly, no GPU. Sub-packages import their heavy optional dependencies where they are used.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
