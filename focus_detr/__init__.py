"""Focus-DETR for detectron2: efficient DETR encoders with foreground token selection."""

from .compile_cache import tag_compile_cache_with_cpu_capability

__version__ = "0.1.0"

tag_compile_cache_with_cpu_capability()
