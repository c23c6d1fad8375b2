"""Data: listing image folders, splitting and sharding, decoding, tf.data batches, phantoms.

Data flows one way: listing -> split -> shard -> decode -> batches.
"""

from hvdmri.data.listing import CLASS_NAMES, Listing, list_images

__all__ = ["CLASS_NAMES", "Listing", "list_images"]
