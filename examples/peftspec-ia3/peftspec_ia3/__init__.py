"""(IA)³ for peftspec, as a third-party plugin (see :mod:`peftspec_ia3.plugin`)."""

__version__ = "0.1.0"
