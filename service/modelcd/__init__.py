"""modelcd: continuous deployment for machine-learning models.

Kept free of imports: the scoring runtime (``modelcd.scoring``) is copied into bundles and
images together with this file and must not pull the control plane in.
"""

__version__ = "0.1.0"
