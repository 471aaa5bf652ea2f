"""Architecture zoo. Importing this package registers every architecture.

Each module holds one family and registers its names with
:func:`defense_core.registry.register_model`; build models with
:func:`defense_core.registry.create_model`.
"""

from defense_core.models import preact_resnet, small_cnn, tv

__all__ = ["preact_resnet", "small_cnn", "tv"]
