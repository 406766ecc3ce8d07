"""peftrun: declarative parameter-efficient fine-tuning on our own adapter core."""

__version__ = "0.1.0"
