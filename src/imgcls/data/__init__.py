"""Data: discovery, verification and decoded cache, batched augmentation, splits."""

from imgcls.data.augment import BatchAugment, to_float
from imgcls.data.images import BadImage, load_rgb
from imgcls.data.prepare import PreparedData, Split, prepare, prepare_eval, summarize_report
from imgcls.data.rows import ImageRows

__all__ = ["BatchAugment", "to_float", "BadImage", "load_rgb", "ImageRows", "PreparedData", "Split", "prepare", "prepare_eval", "summarize_report"]
