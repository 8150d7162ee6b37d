"""nccr-guard: adversarial-input detection by neuron cover change rate (NCCR).

Importing the package loads neither torch nor onnxruntime: backends import their framework lazily.
"""

__version__ = "0.1.0"
