"""Trigger families. Importing this package registers every family."""

from defense_core.attacks.families import badnets, blended, sig, wanet

__all__ = ["badnets", "blended", "sig", "wanet"]
