from .param_groups import lr_factor_by_prefix

__all__ = ["lr_factor_by_prefix"]
