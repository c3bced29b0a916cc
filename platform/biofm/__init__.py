"""biofm: a biosignal foundation model platform on Ray."""

__version__ = "0.1.0"
