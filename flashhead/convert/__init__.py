"""`flashhead convert`: make a FlashHead model folder from a Hugging Face folder or a GGUF file."""

from flashhead.convert.build import ConvertOptions, ConvertResult, convert
from flashhead.convert.source import ConvertError

__all__ = ["ConvertError", "ConvertOptions", "ConvertResult", "convert"]
