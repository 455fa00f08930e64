"""easgd-local: Elastic Averaging SGD and its family on one machine with several workers.

Kept free of imports: every spawned worker imports this package, and pays for what it pulls in.
"""

__version__ = "0.1.0"
