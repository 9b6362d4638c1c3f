"""Algorithm 2 (paper section 4.4): frozen speech encoder -> trainable adaptor -> LLM with kappa-selected tensors.

    from kappatune.multimodal import SpeechAdaptor, SpeechLLM, build_inputs
"""

from .adaptor import SpeechAdaptor
from .alignment import build_inputs
from .model import SpeechLLM, word_error_rates

__all__ = ["SpeechAdaptor", "SpeechLLM", "build_inputs", "word_error_rates"]
