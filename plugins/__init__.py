"""peftspec's built-in method plugins, installed as ``peftspec_plugins``.

Each module here is registered through the ``peftspec`` entry-point group of
the ``peftspec`` distribution, exactly as a third-party plugin would be.
"""
