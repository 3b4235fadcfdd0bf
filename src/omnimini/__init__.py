"""omnimini: an open GPT-4o-mini-class omni MoE system."""
__version__ = "0.1.0"
