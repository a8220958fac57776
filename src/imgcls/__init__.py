"""imgcls: train, evaluate, explain and study image classifiers."""

__version__ = "0.1.0"
